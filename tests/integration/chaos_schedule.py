"""Randomized chaos for the serving tree: a schedule drawn from a seed, and what it may end in.

A Schedule is a pure function of its seed (`draw(seed, liveness)`, random.Random(seed) and
nothing else): the flags of the tree (`vsup run --engine sim`, TP 2, two API servers, the sim KV
connector on), the clients (streaming and plain, each with its own length and start time, plus an
optional prober that opens a new connection for a short request every 20 ms for the whole run),
and a list of actions, each anchored on an event of the run and delayed from it:

  anchors   spawn (the Popen), started:NODE (its supervisor logged "started NODE (pid N)"),
            ready ("root: all 3 children ready"), sig1 / sig2 (when the runner sent the first /
            second signal to the root), teardown ("root: stopping engine-core": the API servers
            are gone, engine-core stops its ranks, which may defer for KV transfers), stopped
            (a SIGSTOP's own SIGCONT is anchored on the SIGSTOP)
  actions   signal (SIGTERM or SIGINT to the root: the first, second and third signal), kill
            (SIGKILL of a node or of the root), stop (SIGSTOP, then SIGCONT after its duration;
            with liveness detection (`--liveness-timeout`) also a stop that is never continued),
            crash (VSUP_TEST_FAULT=NODE:crash@POINT, set in the tree's environment at spawn;
            it "happens" when the node logs "injected crash at")

Timing decides which actions land and when (an action whose anchor never comes, or whose node is
already gone, is not applied); so the expected outcome is derived from what was applied, at what
time, with a few facts observed at that moment (was the node still running, had the tree become
ready, had the root blocked its signals yet). Where a race makes two outcomes legitimate, both are
allowed: `expected_exits` documents each such set (RACES).

Pure logic, no processes: tests/integration/test_chaos.py runs the schedules and checks them.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field

NODES = ("engine-core", "worker-tp0", "worker-tp1", "api-server-0", "api-server-1")
API_SERVERS = ("api-server-0", "api-server-1")
PHASES = ("starting", "serving", "draining", "tearing-down")

# Root signals are sent at least this far apart (the runner holds one back until then), so that
# the coalescing of a repeated signal (one within 50 ms of the last counts once) never merges two.
SIGNAL_GAP_S = 0.15
# After a second signal every remaining stop is capped at 500 ms: the root's three children one
# after the other (engine-core's ranks inside its own 500 ms), with room for the reaping.
SECOND_SIGNAL_BOUND_S = 3.0
# After a third signal (or a SIGKILL of the root) every process group is killed at once.
KILL_BOUND_S = 1.5
# Two deaths this close in time may be seen by the root in either order.
RACE_WINDOW_S = 0.1
# A node stopped for good is found by its parent's pings within --liveness-timeout (+ one
# interval); this much later the first signal comes (the detection must have won by then).
LIVENESS_MARGIN_S = 1.0
# What a loaded 2-core machine may add to any bound (the tree's own deadlines are exact; the
# reaping, the runner's polling and other processes on the machine are not).
BOUND_SLACK_S = 3.0

# The sets of exit statuses a race makes legitimate, by name (expected_exits cites them).
RACES = {
    "start-death": "a node dies while the tree starts: 3 (start failure) if it or the ancestor "
                   "the root started had not reported ready yet, 5 (unexpected death) if it had",
    "start-after-signal": "a node crashes at start-up around the first signal: its start failure "
                          "(3) or, once the shutdown began, an unexpected death (5)",
    "exiting": "a SIGKILL that reached a node after it had logged its own clean stop may find it "
               "exited already (no effect) or still exiting (a failure: 5)",
    "killed-anyway": "a death after a third signal, or after the node's supervisor killed "
                     "something at a deadline, may land on a process that was being killed "
                     "anyway: its own failure (5) or not counted",
    "deadline": "a SIGSTOPped node (or root) may or may not be past its stop deadline when it "
                "is continued (the deadline is capped at 500 ms after a second signal): 4 or not",
    "hurry": "after a second signal a rank still deferring for KV transfers, or a node slow to "
             "stop, is SIGKILLed at the 500 ms cap: 4 or not",
    "third": "a third signal SIGKILLs what is still running: 4, or 0 when everything had already "
             "stopped",
    "order": "two deaths within RACE_WINDOW_S: the root may see either first",
    "reported-late": "a rank's death (or its being killed as hung) reaches the root as "
                     "engine-core's exit status, which comes after engine-core has stopped the "
                     "other ranks (their KV deferral, a stopped rank's deadline): a second or "
                     "third signal meanwhile may have engine-core SIGKILLed first (4) instead (5)",
    "parent-stopped": "a node killed while its parent is SIGSTOPped: the parent, once continued, "
                      "sees the death (5), or is itself killed first, at its stop deadline (4) or "
                      "for being hung (5), and the death is not counted",
    "root-early": "a signal that reaches the root before it blocked its signals (start-up) kills "
                  "it by default: -N",
    "root-exiting": "a SIGKILL of the root after it logged its last line ('done in') may find "
                    "it exited already",
    "hung": "a node stopped for good is detected by its parent's liveness ping (5), or, when the "
            "shutdown began first, killed at its stop deadline (4)",
}


@dataclass(frozen=True)
class Flags:
    token_ms: int
    drain_s: float         # --shutdown-timeout
    kv_ms: int             # --sim-kv-transfer-ms
    kv_timeout_s: float    # --kv-shutdown-timeout
    liveness: tuple[float, float] | None = None  # (--liveness-timeout, --liveness-interval)

    def argv(self) -> list[str]:
        args = ["--engine", "sim", "--model", "vsup-sim", "--tensor-parallel-size", "2",
                "--api-server-count", "2", "--sim-token-ms", str(self.token_ms),
                "--shutdown-timeout", str(self.drain_s), "--kv-connector", "sim",
                "--sim-kv-transfer-ms", str(self.kv_ms),
                "--kv-shutdown-timeout", str(self.kv_timeout_s)]
        if self.liveness:
            args += ["--liveness-timeout", str(self.liveness[0]),
                     "--liveness-interval", str(self.liveness[1])]
        return args

    def signal_bound(self) -> float:
        """README: after the first signal the whole tree is gone within D + 15 s (+ the KV
        timeout); the same deadlines stop it after an unexpected death."""
        return self.drain_s + 15.0 + self.kv_timeout_s


@dataclass(frozen=True)
class ClientPlan:
    kind: str        # stream | plain
    max_tokens: int
    delay: float     # seconds after ready


@dataclass(frozen=True)
class Action:
    kind: str        # signal | kill | stop | crash
    target: str      # root or a node
    anchor: str      # see the module comment; crash: "env"
    delay: float
    phase: str       # the phase the action was drawn for (its landing decides what it does)
    arg: object = None  # signal: "SIGTERM"/"SIGINT"; stop: seconds or None (never continued);
                        # crash: the point ("start", "step12", "delta7", "drain", "shutdown")
    ordinal: int = 0    # signal: 1, 2 or 3

    def describe(self) -> str:
        what = {"signal": f"signal {self.ordinal} {self.arg} to root",
                "kill": f"SIGKILL {self.target}",
                "stop": f"SIGSTOP {self.target} for "
                        + ("ever" if self.arg is None else f"{self.arg}s"),
                "crash": f"crash {self.target} at {self.arg}"}[self.kind]
        when = "from spawn (VSUP_TEST_FAULT)" if self.anchor == "env" else \
            f"at {self.anchor} + {self.delay:.3f}s"
        return f"{what} {when} [{self.phase}]"


@dataclass(frozen=True)
class Schedule:
    seed: int
    flags: Flags
    serve_s: float               # ready -> first signal, when it is drawn for serving
    clients: tuple[ClientPlan, ...]
    prober: bool
    actions: tuple[Action, ...]

    def crash_env(self) -> str:
        return ",".join(f"{a.target}:crash@{a.arg}" for a in self.actions if a.kind == "crash")

    def describe(self) -> str:
        f = self.flags
        lines = [f"seed {self.seed}: token {f.token_ms}ms, drain {f.drain_s}s, kv transfer "
                 f"{f.kv_ms}ms, kv timeout {f.kv_timeout_s}s"
                 + (f", liveness {f.liveness[0]}s/{f.liveness[1]}s" if f.liveness else "")
                 + f", serving {self.serve_s:.3f}s"
                 + (", prober" if self.prober else ""),
                 "  clients: " + ", ".join(f"{c.kind}({c.max_tokens}) +{c.delay:.3f}s"
                                           for c in self.clients)]
        lines += [f"  {a.describe()}" for a in self.actions]
        return "\n".join(lines)


def _crash_point(r: random.Random, node: str, phase: str, flags: Flags, serve_s: float) -> str:
    steps_serving = max(4, int(serve_s * 1000 / flags.token_ms))
    if phase == "starting":
        return "start"
    if phase == "tearing-down":
        return "shutdown"
    api = node.startswith("api-server")
    if phase == "draining" and (api or node == "engine-core"):
        return "drain"
    if phase == "draining":  # a rank is never quiesced: a step inside the drain
        steps_drain = max(1, int(flags.drain_s * 1000 / flags.token_ms))
        return f"step{r.randint(steps_serving, steps_serving + steps_drain)}"
    # serving: an API server counts its batches of tokens (about one per step while it has a
    # request), engine-core and ranks their steps.
    n = r.randint(2, max(3, int(steps_serving * 0.8)))
    return f"delta{n}" if api else f"step{n}"


def draw(seed: int, liveness: tuple[float, float] | None = None) -> Schedule:
    """The schedule of SEED: the same seed and liveness flags give the same schedule."""
    r = random.Random(seed)
    flags = Flags(token_ms=r.choice((2, 4, 8)), drain_s=r.choice((0.0, 0.2, 0.5, 1.0)),
                  kv_ms=r.choice((50, 200, 600)), kv_timeout_s=r.choice((0.1, 0.3, 0.8)),
                  liveness=liveness)
    serve_s = round(r.uniform(0.15, 0.6), 3)
    clients = []
    for kind, n in (("stream", r.randint(1, 4)), ("plain", r.randint(0, 3))):
        clients += [ClientPlan(kind, r.choice((2, 12, 60, 4000)),
                               round(r.uniform(0, serve_s * 0.5), 3)) for _ in range(n)]
    prober = r.random() < 0.7

    actions: list[Action] = []
    sig = lambda: r.choice(("SIGTERM", "SIGINT"))  # noqa: E731
    if r.random() < 0.1:
        actions.append(Action("signal", "root", "spawn", round(r.uniform(0, 0.06), 3),
                              "starting", sig(), 1))
    else:
        actions.append(Action("signal", "root", "ready", serve_s, "serving", sig(), 1))
    if r.random() < 0.4:
        # The second signal while draining (when there is a drain) or during the teardown (the
        # ranks deferring for KV transfers); the third soon after it.
        if flags.drain_s > 0 and r.random() < 0.5:
            actions.append(Action("signal", "root", "sig1",
                                  round(r.uniform(0, flags.drain_s), 3), "draining", sig(), 2))
        else:
            actions.append(Action("signal", "root", "teardown",
                                  round(r.uniform(0, flags.kv_timeout_s), 3), "tearing-down",
                                  sig(), 2))
        if r.random() < 0.4:
            actions.append(Action("signal", "root", "sig2", round(r.uniform(0, 0.3), 3),
                                  "tearing-down", sig(), 3))

    crashed: set[str] = set()
    for _ in range(r.choices((0, 1, 2), (15, 55, 30))[0]):
        kind = r.choices(("kill", "stop", "crash"), (30, 35, 35))[0]
        root = kind != "crash" and r.random() < 0.08
        target = "root" if root else r.choice(NODES)
        api = target.startswith("api-server")
        phases = PHASES[:3] if api else PHASES  # API servers are gone before the teardown
        phase = r.choices(phases, (15, 40, 25, 20)[:len(phases)])[0]
        if kind == "crash":
            if target in crashed:
                continue
            crashed.add(target)
            actions.append(Action("crash", target, "env", 0.0, phase,
                                  _crash_point(r, target, phase, flags, serve_s)))
            continue
        if phase == "starting":
            anchor = "started:" + ("engine-core" if root else target)
            delay = r.uniform(0, 0.01)
        elif phase == "serving":
            anchor, delay = "ready", r.uniform(0, serve_s)
        elif phase == "draining":
            anchor, delay = "sig1", r.uniform(0, flags.drain_s + 0.1)
        else:
            anchor, delay = "teardown", r.uniform(0, 0.02 + flags.kv_timeout_s * 0.8)
        arg = None
        if kind == "stop":
            if liveness and not root and phase == "serving" and r.random() < 0.3:
                arg = None  # never continued: the liveness ping must find it
            else:
                arg = r.choice((0.05, 0.3, 0.8, 1.5) if not liveness else (0.05, 0.3))
                if root:
                    arg = min(arg, 0.8)
        actions.append(Action(kind, target, anchor, round(delay, 3), phase, arg))
    hung = [a for a in actions if a.kind == "stop" and a.arg is None]
    if hung and actions[0].anchor == "ready":
        # A node stopped for good while serving: the first signal waits until the liveness
        # ping must have found it, so that the detection (not a stop deadline) ends the tree.
        timeout, interval = liveness
        wait = round(max(a.delay for a in hung) + timeout + interval + LIVENESS_MARGIN_S, 3)
        actions[0] = dataclasses.replace(actions[0], delay=max(actions[0].delay, wait))
    return Schedule(seed, flags, serve_s, tuple(clients), prober, tuple(actions))


# ---------------------------------------------------------------------------------------------
# What the schedule may end in


@dataclass
class Applied:
    """An action as it landed: its time (seconds after spawn) and what was true then."""

    action: Action
    t: float
    facts: dict = field(default_factory=dict)
    # kill: running (the process was not a zombie), ready (the root had logged all children
    #   ready), exiting (the node had logged its own stop), root_done (root: done in)
    # stop: until (when it was continued; None: never), root_stopped (for the root itself)
    # signal: blocked (SIGTERM/SIGINT were blocked in the root when sent)


@dataclass(frozen=True)
class Fact:
    """Something that decides the exit status: the codes it may produce, whether it is certain,
    and whether it came before the shutdown began (forced: the first one wins)."""

    t: float
    codes: frozenset
    optional: bool
    forced: bool
    race: str = ""


def _signal_time(applied: list[Applied], n: int) -> float | None:
    for a in applied:
        if a.action.kind == "signal" and a.action.ordinal == n:
            return a.t
    return None


def facts_of(sched: Schedule, applied: list[Applied], escalated_at: float | None) -> list[Fact]:
    """The facts of a run. ESCALATED_AT: when a supervisor first logged that it killed a node
    (at a deadline, or at the third signal), None if it never did."""
    t1, t2, t3 = (_signal_time(applied, n) for n in (1, 2, 3))
    out: list[Fact] = []
    shutdown_from = t1  # a death before it is the forced outcome; after it a failure

    def hurried_after(t: float) -> bool:
        return any(x is not None and x >= t for x in (t2, t3))

    def killed_anyway(t: float) -> bool:
        return (t3 is not None and t >= t3) or (escalated_at is not None and t >= escalated_at)

    for a in applied:
        act, t = a.action, a.t
        forced = shutdown_from is None or t < shutdown_from
        if act.kind == "crash":
            if act.arg == "start":
                # Armed at spawn, the crash happens when the node starts, which is not observed:
                # once a first signal was sent at all, it may come before or after the crash.
                if shutdown_from is None:
                    out.append(Fact(t, frozenset({3}), False, True))
                else:
                    out.append(Fact(t, frozenset({3, 5}), False, forced, "start-after-signal"))
            elif act.target.startswith("worker") and hurried_after(t):
                out.append(Fact(t, frozenset({4, 5}), killed_anyway(t), False, "reported-late"))
            else:
                out.append(Fact(t, frozenset({5}), killed_anyway(t), forced,
                                "killed-anyway" if killed_anyway(t) else ""))
        elif act.kind == "kill" and act.target != "root":
            if not a.facts.get("running"):
                continue
            codes = frozenset({5} if a.facts.get("ready") else {3, 5})
            race = "" if a.facts.get("ready") else "start-death"
            optional = False
            if a.facts.get("exiting"):
                optional, race = True, "exiting"
            if killed_anyway(t):
                optional, race = True, "killed-anyway"
            if act.target.startswith("worker") and hurried_after(t):
                codes, forced, race = codes | {4}, False, "reported-late"
            if a.facts.get("parent_stopped"):
                # Its parent cannot see the death while stopped: it may be killed first (for
                # being hung, or at its deadline), or continued and see it.
                optional, race = True, "parent-stopped"
                codes = codes | {4}
            out.append(Fact(t, codes, optional, forced, race))
        elif act.kind == "stop":
            until = a.facts.get("until")
            if until is None and act.target != "root" and sched.flags.liveness:
                timeout, interval = sched.flags.liveness
                detect = t + timeout + interval
                if t1 is not None and t1 < detect + LIVENESS_MARGIN_S * 0.9:
                    out.append(Fact(detect, frozenset({4, 5}), False, False, "hung"))
                elif act.target.startswith("worker") and hurried_after(detect):
                    # engine-core reports the hung rank by exiting, after stopping the other
                    # ranks; a second or third signal meanwhile may have it SIGKILLed first.
                    out.append(Fact(detect, frozenset({4, 5}), False, False, "reported-late"))
                else:
                    out.append(Fact(detect, frozenset({5}), False, True))
                continue
            end = until if until is not None else float("inf")
            # Only a shutdown has stop deadlines; without a second signal they are 3 s or more
            # away, longer than any stop drawn, but a loaded machine may stretch a stop's effect.
            in_shutdown = t1 is not None and end >= t1
            if in_shutdown:
                out.append(Fact(max(t, t1), frozenset({4}), True, False, "deadline"))
    if t2 is not None:
        out.append(Fact(t2, frozenset({4}), True, False, "hurry"))
    if t3 is not None:
        out.append(Fact(t3, frozenset({4}), True, False, "third"))
    return out


def outcome_of(facts: list[Fact]) -> set[int]:
    """The exit statuses a given set of facts (all of them happened) can produce, each fact
    taking each of its codes in turn: the first forced one wins (within RACE_WINDOW_S, any of
    the first); else 5 (or 3) over 4 over 0 (Supervisor: a forced outcome, then failures, then
    escalations)."""
    out: set[int] = set()
    for choice in itertools.product(*[sorted(f.codes) for f in facts]):
        pairs = list(zip(facts, choice))
        forced = sorted((f.t, c) for f, c in pairs if f.forced)
        if forced:
            out |= {c for t, c in forced if t <= forced[0][0] + RACE_WINDOW_S}
            continue
        codes = {c for _, c in pairs}
        out.add(5 if 5 in codes else 3 if 3 in codes else 4 if 4 in codes else 0)
    return out


def expected_exits(sched: Schedule, applied: list[Applied],
                   escalated_at: float | None) -> tuple[set[int], list[str]]:
    """The exit statuses of `vsup run` (Popen's returncode) that this run may legitimately end
    in, and the names of the races (RACES) that made the set larger than one."""
    races: set[str] = set()
    root_kill = next((a for a in applied if a.action.kind == "kill" and a.action.target == "root"
                      and a.facts.get("running")), None)
    facts = facts_of(sched, applied, escalated_at)
    if root_kill is not None:
        # Only what came before the kill can have decided anything.
        facts = [f for f in facts if f.t < root_kill.t]
    certain = [f for f in facts if not f.optional]
    optional = [f for f in facts if f.optional]
    allowed: set[int] = set()
    for k in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, k):
            allowed |= outcome_of(certain + list(chosen))
    races |= {f.race for f in facts if f.race}
    forced = sorted((f for f in certain + optional if f.forced), key=lambda f: f.t)
    if len(forced) > 1 and forced[1].t <= forced[0].t + RACE_WINDOW_S:
        races.add("order")
    if root_kill is not None:
        if root_kill.facts.get("root_done"):
            allowed |= {-9}
            races.add("root-exiting")
        else:
            allowed = {-9}
    for a in applied:
        if a.action.kind == "signal" and not a.facts.get("blocked", True):
            allowed.add(-(15 if a.action.arg == "SIGTERM" else 2))
            races.add("root-early")
    return allowed, sorted(races)


def bound_of(sched: Schedule, applied: list[Applied]) -> float:
    """Seconds after spawn by which every process of the tree must be gone: the earliest of the
    documented bounds that apply (README "How shutdown works"), plus the time the root itself was
    stopped by the schedule, plus BOUND_SLACK_S."""
    f = sched.flags
    ends = []
    for a in applied:
        act = a.action
        if act.kind == "signal":
            ends.append(a.t + {1: f.signal_bound(), 2: SECOND_SIGNAL_BOUND_S,
                               3: KILL_BOUND_S}[act.ordinal])
        elif act.kind == "kill" and act.target == "root":
            ends.append(a.t + KILL_BOUND_S)
        elif act.kind in ("kill", "crash"):
            ends.append(a.t + f.signal_bound())
        elif act.kind == "stop" and a.facts.get("until") is None and f.liveness:
            ends.append(a.t + f.liveness[0] + f.signal_bound())
    root_stopped = sum((a.facts.get("until") or a.t) - a.t for a in applied
                       if a.action.kind == "stop" and a.action.target == "root")
    return (min(ends) if ends else float("inf")) + root_stopped + BOUND_SLACK_S
