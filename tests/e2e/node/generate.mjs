#!/usr/bin/env node
// A Node.js client of the kernel: proof that the contract works from another language.
//
//   node generate.mjs ADDRESS PROMPT [MAX_TOKENS] [--cancel-after N] [--deadline SECONDS]
//
// Streams KernelService.Generate (greedy, max_tokens default 16), writes each text delta
// to stderr as it arrives, then prints ONE JSON line to stdout:
//   {"text", "taskId", "model", "messages", "finishReason", "completionTokens"}
// With --cancel-after N it cancels the call after N messages and prints
//   {"cancelled": true, "messages": N}
// A gRPC error prints {"error": {"code": <number>, "details": ...}} and exits 1.

import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PROTO_ROOT = path.resolve(HERE, "..", "..", "..", "protos");

function usage(message) {
  process.stderr.write(
    `generate.mjs: ${message}\n` +
      "usage: node generate.mjs ADDRESS PROMPT [MAX_TOKENS] [--cancel-after N] [--deadline S]\n",
  );
  process.exit(2);
}

function parseArgs(argv) {
  const positional = [];
  const options = { cancelAfter: null, deadlineS: 60 };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === "--cancel-after" || arg === "--deadline") {
      const value = Number(argv[i + 1]);
      if (argv[i + 1] === undefined || !Number.isFinite(value) || value <= 0) {
        usage(`${arg} needs a positive number`);
      }
      if (arg === "--cancel-after") options.cancelAfter = Math.floor(value);
      else options.deadlineS = value;
      i += 1;
    } else {
      positional.push(arg);
    }
  }
  if (positional.length < 2 || positional.length > 3) usage("expected ADDRESS and PROMPT");
  const [address, prompt, maxTokensArg] = positional;
  const maxTokens = maxTokensArg === undefined ? 16 : Number(maxTokensArg);
  if (!Number.isInteger(maxTokens)) usage(`MAX_TOKENS must be an integer, got ${maxTokensArg}`);
  return { address, prompt, maxTokens, ...options };
}

function loadKernelService() {
  const definition = protoLoader.loadSync(path.join(PROTO_ROOT, "llmos/v1/kernel.proto"), {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_ROOT],
  });
  return grpc.loadPackageDefinition(definition).llmos.v1.KernelService;
}

function printJson(value) {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const KernelService = loadKernelService();
  const client = new KernelService(args.address, grpc.credentials.createInsecure());
  const request = {
    prompt: args.prompt,
    sampling: { temperature: 0, max_tokens: args.maxTokens },
  };
  const deadline = new Date(Date.now() + args.deadlineS * 1000);
  const call = client.Generate(request, { deadline });

  const pieces = [];
  let taskId = "";
  let model = "";
  let finishReason = "FINISH_REASON_UNSPECIFIED";
  let completionTokens = 0;
  let cancelled = false;
  let settled = false;

  const finish = (exitCode, value) => {
    if (settled) return;
    settled = true;
    printJson(value);
    client.close();
    process.exitCode = exitCode;
  };

  call.on("data", (message) => {
    if (cancelled) return; // messages already in flight when we cancelled
    pieces.push(message.text);
    process.stderr.write(message.text);
    if (message.task_id) taskId = message.task_id;
    if (message.model) model = message.model;
    if (message.finish_reason && message.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
      finishReason = message.finish_reason;
    }
    if (message.usage) completionTokens = message.usage.completion_tokens;
    if (args.cancelAfter !== null && pieces.length >= args.cancelAfter && !cancelled) {
      cancelled = true;
      call.cancel();
    }
  });

  call.on("error", (error) => {
    process.stderr.write("\n");
    if (cancelled && error.code === grpc.status.CANCELLED) {
      finish(0, { cancelled: true, messages: pieces.length, taskId });
      return;
    }
    finish(1, { error: { code: error.code, details: error.details } });
  });

  call.on("end", () => {
    process.stderr.write("\n");
    if (cancelled) {
      // The stream ended on its own before the cancel took effect.
      finish(1, { error: { code: -1, details: "the stream ended before it could be cancelled" } });
      return;
    }
    finish(0, {
      text: pieces.join(""),
      taskId,
      model,
      messages: pieces.length,
      finishReason,
      completionTokens,
    });
  });
}

main();
