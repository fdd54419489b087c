// The processes of the serving tree, each a hidden subcommand of the vsup executable
// (`vsup __engine-core`, `vsup __worker`, `vsup __api-server`, `vsup __kv-agent`,
// `vsup __proxy`), started by `vsup run` (the proxy by `vsup proxy`) as vsup-aware children. Each returns its exit status.
#pragma once

namespace vsup::workers {

int engineCoreMain(int argc, char** argv);
int workerMain(int argc, char** argv);
int apiServerMain(int argc, char** argv);
int kvAgentMain(int argc, char** argv);
int proxyMain(int argc, char** argv);
int nodeAgentMain(int argc, char** argv);

}  // namespace vsup::workers
