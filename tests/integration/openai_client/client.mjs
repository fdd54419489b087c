// Drives a vsup serving tree with the official OpenAI Node client (the `openai` npm package),
// for tests/integration/test_openai_client.py.
//
// Usage: node client.mjs BASE_URL      (e.g. http://127.0.0.1:8000/v1; key in $OPENAI_API_KEY)
//
// Runs a completion, a streamed completion, a chat completion and a streamed chat completion
// with usage, then prints one JSON object with what came back and exits 0; on any error it
// prints the error and exits 1. No retries: a failure must show, not be papered over.
import OpenAI from "openai";

const baseURL = process.argv[2];
if (!baseURL) {
  console.error("usage: node client.mjs BASE_URL");
  process.exit(2);
}

const client = new OpenAI({
  baseURL,
  apiKey: process.env.OPENAI_API_KEY,
  maxRetries: 0,
  timeout: 20_000,
});
const model = "vsup-sim";

async function main() {
  const out = {};

  const completion = await client.completions.create({ model, prompt: "hello", max_tokens: 5 });
  out.completion = {
    object: completion.object,
    text: completion.choices[0].text,
    finish_reason: completion.choices[0].finish_reason,
    usage: completion.usage,
  };

  const stream = await client.completions.create({
    model,
    prompt: "hello",
    max_tokens: 4,
    stream: true,
  });
  let text = "";
  let finish = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    for (const choice of chunk.choices) {
      text += choice.text ?? "";
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  out.completion_stream = { text, finish_reason: finish, chunks };

  const chat = await client.chat.completions.create({
    model,
    max_tokens: 3,
    messages: [{ role: "user", content: "hi" }],
  });
  out.chat = {
    object: chat.object,
    role: chat.choices[0].message.role,
    content: chat.choices[0].message.content,
    finish_reason: chat.choices[0].finish_reason,
    usage: chat.usage,
  };

  const chatStream = await client.chat.completions.create({
    model,
    max_tokens: 6,
    messages: [{ role: "user", content: "hi" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  let content = "";
  let role = null;
  let chatFinish = null;
  let usage = null;
  for await (const chunk of chatStream) {
    for (const choice of chunk.choices) {
      if (choice.delta?.role) role = choice.delta.role;
      content += choice.delta?.content ?? "";
      if (choice.finish_reason) chatFinish = choice.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  out.chat_stream = { role, content, finish_reason: chatFinish, usage };

  console.log(JSON.stringify(out));
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`openai client failed: ${err?.stack ?? err}`);
    if (err?.status) console.error(`HTTP status ${err.status}: ${JSON.stringify(err.error)}`);
    process.exit(1);
  },
);
