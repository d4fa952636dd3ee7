// The Vercel AI SDK as a client: generateText with Output.object on the default OpenAI model
// (the Responses one).  Usage: AI_SDK_DIR=<folder with node_modules> BASE_URL=... node ai_sdk.mjs
// Prints {"output": ..., "text": ...} as one JSON line.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const require = createRequire(process.env.AI_SDK_DIR + "/");
const load = (name) => import(pathToFileURL(require.resolve(name)).href);
const { generateText, Output } = await load("ai");
const { createOpenAI } = await load("@ai-sdk/openai");
const { z } = await load("zod");

const openai = createOpenAI({ baseURL: process.env.BASE_URL, apiKey: "unused" });
const result = await generateText({
  model: openai("claude-sonnet-4-6"),
  output: Output.object({ schema: z.object({ city: z.string(), temp: z.number() }) }),
  prompt: "Weather in Lima?",
  maxRetries: 0,
});
console.log(JSON.stringify({ output: result.output, text: result.text }));
