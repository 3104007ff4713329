// An HTTP/1.1 server on Node's http module (libuv's epoll loop, one thread): every GET is
// answered with 200 and the request target, keep-alive on; a connection idle for IDLE_MS
// (between requests, or before its first) is closed.
// Usage: node server.js HOST PORT LOGDIR IDLE_MS
"use strict";
const fs = require("fs");
const http = require("http");
const path = require("path");

const [host, portText, logDir, idleText] = process.argv.slice(2);
const access = fs.createWriteStream(path.join(logDir, "access.log"), { flags: "a" });
const errors = fs.createWriteStream(path.join(logDir, "error.log"), { flags: "a" });

const server = http.createServer((req, res) => {
  const body = req.url + "\n";
  res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": Buffer.byteLength(body) });
  res.end(body);
  access.write(`${req.socket.remoteAddress} "${req.method} ${req.url}" 200\n`);
});
const idleMs = Number(idleText);
// keepAliveTimeout: the wait for the next request on a kept connection.  server.timeout: any
// other inactivity, the wait for a first request included (headersTimeout would not do: it
// starts at a request's first byte and is checked only every connectionsCheckingInterval).
// Both are socket timers on libuv's loop; the socket is destroyed when one fires.
server.keepAliveTimeout = idleMs;
server.timeout = idleMs;
server.on("clientError", (err, socket) => {
  // Node's default answer to a malformed request, written out so the error is logged too.
  errors.write(`clientError ${err.code || err.message}\n`);
  if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
  else socket.destroy();
});

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

server.listen({ host, port: Number(portText), exclusive: true }, () => {
  errors.write(`listening on ${host}:${portText}\n`);
  console.log("READY");
});
