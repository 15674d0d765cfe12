// GET / as the seed's Express app answers it: its middleware records the visit in Redis
// (LPUSH, LTRIM to 5), then the page says which instance served it.  bench/bench_web.py runs
// it beside dockpart-web: node app.js PORT REDIS_URL
const express = require("express");
const { createClient } = require("redis");

const [port, redisUrl] = process.argv.slice(2);
const redis = createClient({ url: redisUrl });
const app = express();
const url = `http://127.0.0.1:${port}`;

app.use((req, res, next) => {
  const visit = `http://${req.headers.host}${req.originalUrl}`;
  redis.lPush("recent", visit).then(() => redis.lTrim("recent", 0, 4)).catch(() => {});
  next();
});

app.get("/", (req, res) => {
  res.send(`<!doctype html>\n<html><head><meta charset="utf-8"><title>seed web app</title></head>\n` +
           `<body><h1>seed web app</h1>\n<p>Served by the instance at <b>${url}</b>.</p>\n</body></html>\n`);
});

redis.connect().then(() => {
  app.listen(Number(port), "127.0.0.1", () => console.log(`seed express listening on ${port}`));
});
