// Generate an image from Node: the proto loaded at run time by @grpc/proto-loader.
//   cd examples/node && npm install
//   STEERSERVE_ADDRESS=127.0.0.1:50051 STEERSERVE_TOKEN=... node generate.mjs "a red circle" out.png
// TLS: set STEERSERVE_CLIENT_CA_FILE (and STEERSERVE_CLIENT_CERT_FILE / _KEY_FILE for mutual TLS).
import { readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const protoRoot = fileURLToPath(new URL("../../proto", import.meta.url));
const definition = protoLoader.loadSync("steerserve/v1/steerserve.proto", {
  includeDirs: [protoRoot], keepCase: true, longs: Number, enums: String, defaults: true,
});
const { SteerServe } = grpc.loadPackageDefinition(definition).steerserve.v1;

const env = process.env;
const read = (name) => (env[name] ? readFileSync(env[name]) : null);
const credentials = env.STEERSERVE_CLIENT_CA_FILE || env.STEERSERVE_CLIENT_TLS === "1"
  ? grpc.credentials.createSsl(read("STEERSERVE_CLIENT_CA_FILE"), read("STEERSERVE_CLIENT_KEY_FILE"),
                               read("STEERSERVE_CLIENT_CERT_FILE"))
  : grpc.credentials.createInsecure();
const client = new SteerServe(env.STEERSERVE_ADDRESS || "127.0.0.1:50051", credentials,
  { "grpc.max_receive_message_length": 64 * 1024 * 1024 });

const metadata = new grpc.Metadata();
metadata.set("authorization", `Bearer ${env.STEERSERVE_TOKEN}`);
const [prompt = "a red dotted star on a blue striped background", output = "out.png"] = process.argv.slice(2);
const deadline = new Date(Date.now() + 300_000);  // always set a deadline

client.Generate({ prompt, seed: 0, steps: Number(env.STEPS || 0) }, metadata, { deadline }, (err, response) => {
  if (err) {
    // err.code is the gRPC status (3 INVALID_ARGUMENT, 5 NOT_FOUND, 8 RESOURCE_EXHAUSTED, ...);
    // RESOURCE_EXHAUSTED from admission carries grpc-retry-pushback-ms in err.metadata.
    const pushback = err.metadata?.get("grpc-retry-pushback-ms")?.[0];
    console.error(`error: ${grpc.status[err.code]}: ${err.details}` + (pushback ? ` (retry in ${pushback} ms)` : ""));
    process.exit(1);
  }
  const image = response.images[0];
  writeFileSync(output, image.data);
  console.log(`wrote ${output} (${image.width}x${image.height}), seed ${response.seeds[0]}, ` +
              `${response.timings.total_seconds.toFixed(2)} s on the server`);
});
