"""
Talk to a trained model: a streamed command-line chat, and (--web) one small standard-library HTTP server that serves
a self-contained web page, the server-sent-events endpoint the page streams from and an OpenAI-compatible API.

    python chat.py                            interactive chat (quit/exit end, clear starts over, EOF ends)
    python chat.py -p "Why is the sky blue?"  answer once and exit
    python chat.py --web [--port 8000]        GET / (ui.html), POST /chat/completions (SSE), POST /v1/chat/completions,
                                              GET /v1/models, GET /health, GET /stats
    python chat.py --bench                    time to first token and tokens/s, 1, 8 and 32 concurrent streams (HTTP)
"""
import os
import sys
import json
import time
import uuid
import queue
import random
import argparse
import threading
import socket
import traceback
import contextlib
import http.client
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

import torch

import common
from tokenizer import Tokenizer, get_tokenizer
from model import (Engine, RowState, TextStreamer, BenchTokenizer, load_model, build_model, config_from_depth,
                   sample_next_token)

# the API's abuse limits (HTTP 400 beyond them)
MAX_MESSAGES, MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS = 500, 8000, 32000
SAMPLING_LIMITS = {"temperature": (0.0, 2.0), "top_k": (0, 200), "max_tokens": (1, 4096)}  # CLI flags, API and ui.html
MAX_BODY_BYTES = 1 << 20     # 32,000 characters of content fit many times over; larger bodies get 413
QUEUE_WAIT_S = 120           # a request that waits this long for a place in a batch gets 503
REQUEST_DEADLINE_S = 30      # a request's line, headers and body must all arrive within this, however slowly
MAX_CONNECTIONS = 256        # open connections beyond this get 503 at once (each holds a thread)
REPLY_SHARE = 4              # old turns go until the prompt leaves min(max_tokens, context // 4) for the reply
UI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui.html")
# tool calls are shown readably instead of as raw special tokens
TOOL_MARKERS = {"<|python_start|>": "[python: ", "<|python_end|>": "]",
                "<|output_start|>": " [output: ", "<|output_end|>": "] "}

# -----------------------------------------------------------------------------
# generation shared by the CLI and the server

class Reply:
    """One assistant reply: streams display text (UTF-8 safe, tool calls bracketed) and keeps the generated ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")}
        self.markers = {tokenizer.encode_special(name): text for name, text in TOOL_MARKERS.items()}
        self.streamer = TextStreamer(tokenizer)
        self.ids, self.finish = [], "length"

    def push(self, token):
        """The display text that `token` completes ("" while in the middle of a UTF-8 character)."""
        if token in self.markers:
            self.streamer = TextStreamer(self.tokenizer)  # a special token closes the current run of text
            return self.markers[token]
        return self.streamer.push(token)

    def stream(self, engine, prompt, max_tokens, temperature, top_k, seed):
        """Yield text pieces until an end token (finish 'stop', the token not kept) or max_tokens (finish 'length')."""
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                         top_k=top_k or None, seed=seed):
            token = column[0]
            if token in self.stops:
                self.finish = "stop"
                return
            self.ids.append(token)
            piece = self.push(token)
            if piece:
                yield piece

def fit_context(prompts, left_out, context, max_tokens):
    """The longest candidate prompt (shortest first, built lazily; left_out: the messages each drops) that leaves
    min(max_tokens, context // REPLY_SHARE) for the reply, else the first -> (prompt, room (< 1: no fit), note)."""
    need = min(max_tokens, context // REPLY_SHARE)
    prompt, dropped = None, 0
    for ids, n in zip(prompts, left_out):
        if prompt is not None and len(ids) + need > context:
            break
        prompt, dropped = ids, n
    room = min(max_tokens, context - len(prompt))
    if dropped or room < need:
        return prompt, room, (f"the {dropped} oldest message(s) were left out and the reply may use {room} tokens, "
                              f"to fit the model's {context}-token context")
    return prompt, room, ""

# -----------------------------------------------------------------------------
# command-line chat

def chat_cli(args, tokenizer, engine, context):
    user_start = tokenizer.encode_special("<|user_start|>")
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    max_tokens = args.max_tokens or 256
    history = [tokenizer.encode_special("<|bos|>")]  # the conversation is kept as tokens
    if args.prompt is None:
        print(f"nanochat ({args.source}) - type 'quit' or 'exit' to leave, 'clear' to start a new conversation")
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            try:
                text = input("\nUser: ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
        command = text.strip().lower() if args.prompt is None else ""  # -p answers its text once, whatever it says
        if command in ("quit", "exit"):
            break
        if command == "clear":
            history = history[:1]
            print("(conversation cleared)")
            continue
        if not text.strip():
            continue
        tokens = history + tokenizer.render_prompt([{"role": "user", "content": text}])[1:]  # the turn, after <|bos|>
        starts = [i for i, t in enumerate(tokens) if t == user_start][::-1]  # where each turn begins, latest first
        left_out = [2 * n for n in range(len(starts))][::-1]  # a turn is two messages
        prompt, room, note = fit_context([tokens[:1] + tokens[i:] for i in starts], left_out, context, max_tokens)
        if room < 1:
            print(f"(that message needs {len(prompt)} tokens; this model's context is {context} tokens: not sent)")
            continue
        if note:
            print(f"({note})")
        history, reply = prompt, Reply(tokenizer)
        if args.prompt is None:
            print("\nAssistant: ", end="", flush=True)
        seed = random.randint(0, 2**31 - 1)
        try:
            for piece in reply.stream(engine, history, room, args.temperature, args.top_k, seed):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" (interrupted)", end="")
        print(flush=True)
        history += reply.ids + [assistant_end]  # every reply in the history is closed, even when cut
        if args.prompt is not None:
            break

# -----------------------------------------------------------------------------
# request parsing and validation: every problem becomes an ApiError with a clear reason

class ApiError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

def error_json(status, message):  # OpenAI's error shape, for every endpoint
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}

def read_json_body(handler):
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        raise ApiError(411, "send the body with a Content-Length header (chunked bodies are not accepted)")
    if len(handler.headers.get_all("Content-Length", [])) > 1:
        raise ApiError(400, "send one Content-Length header, not several")
    try:
        length = int(handler.headers.get("Content-Length", ""))
    except ValueError:
        raise ApiError(411, "a Content-Length header is required") from None
    if length < 0:
        raise ApiError(400, "negative Content-Length")
    if length > MAX_BODY_BYTES:
        if length <= 16 * MAX_BODY_BYTES:  # read and drop it: the client sees our answer, not a reset connection
            for start in range(0, length, 65536):
                if not handler.rfile.read(min(65536, length - start)):
                    break
        handler.close_connection = True
        raise ApiError(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES} bytes")
    try:
        body = handler.rfile.read(length)
        handler.server.deadlines.pop(handler.connection, None)  # all arrived: generation may take as long as it takes
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    return data

def parse_content(i, content):
    if isinstance(content, list):  # OpenAI style: a list of text parts, joined
        if not all(isinstance(p, str) or (isinstance(p, dict) and p.get("type", "text") == "text"
                                          and isinstance(p.get("text"), str)) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported")
        content = "\n".join(p if isinstance(p, str) else p["text"] for p in content)
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, f"messages[{i}].content must be a non-empty string or list of text parts")
    if len(content) > MAX_MESSAGE_CHARS:
        raise ApiError(400, f"messages[{i}].content is {len(content)} characters; the limit is {MAX_MESSAGE_CHARS}")
    return content

def parse_messages(data):
    """-> [{"role", "content"}]: user/assistant messages after an optional leading system message, content as text."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"{len(messages)} messages; the limit is {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("user", "assistant") and not (role == "system" and i == 0):
            raise ApiError(400, f"messages[{i}].role must be 'user' or 'assistant' (or 'system' first), not {role!r}")
        out.append({"role": role, "content": parse_content(i, m.get("content"))})
    total = sum(len(m["content"]) for m in out)
    if total > MAX_TOTAL_CHARS:
        raise ApiError(400, f"the messages hold {total} characters; the limit is {MAX_TOTAL_CHARS}")
    if out[0]["role"] == "system" and (len(out) < 2 or out[1]["role"] != "user"):
        raise ApiError(400, "a system message must be followed by a user message")
    return out

def parse_number(data, key, bounds, default, integer):
    value = data.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]
    if not ok or (integer and value != int(value)):
        raise ApiError(400, f"'{key}' must be {kind} in [{bounds[0]}, {bounds[1]}], got {json.dumps(value)}")
    return int(value) if integer else float(value)

def parse_sampling(data, defaults):
    n = data.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"'n' = {json.dumps(n)} is not supported: this server returns exactly one choice (n = 1)")
    max_key = "max_tokens" if data.get("max_tokens") is not None else "max_completion_tokens"
    seed, stop = data.get("seed"), data.get("stop")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"'seed' must be an integer, got {json.dumps(seed)}")
    if not isinstance(data.get("stream"), (bool, type(None))):
        raise ApiError(400, f"'stream' must be true or false (a JSON boolean), got {json.dumps(data['stream'])}")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to 4, got {json.dumps(data['stop'])}")
    limits = SAMPLING_LIMITS
    return dict(temperature=parse_number(data, "temperature", limits["temperature"], defaults["temperature"], False),
                top_k=parse_number(data, "top_k", limits["top_k"], defaults["top_k"], True),
                max_tokens=parse_number(data, max_key, limits["max_tokens"], defaults["max_tokens"], True),
                seed=random.randint(0, 2**31 - 1) if seed is None else seed % 2**63, stop=stop)

# -----------------------------------------------------------------------------
# the worker pool: one model replica + Engine per GPU (one on CPU), each decoding up to `cap` requests at once

Job = namedtuple("Job", "prompt params reply out cancel worker")  # out: True once admitted, pieces, None (or an error)
Worker = namedtuple("Worker", "id device engine inbox")  # inbox: the Jobs waiting for its decode_loop
App = namedtuple("App", "tokenizer pool model_id created defaults")  # what the server's handlers read

class WorkerPool:
    def __init__(self, engines, max_queue, cap, context):
        self.workers = [Worker(i, str(e.model.get_device()), e, queue.Queue()) for i, e in enumerate(engines)]
        self.max_queue, self.cap, self.context = max_queue, cap, context
        self.load = [0] * len(engines)  # each worker's requests, in its batch or waiting
        self.lock = threading.Lock()
        for w in self.workers:
            threading.Thread(target=decode_loop, args=(self, w), daemon=True).start()

    def waiting(self):
        return sum(max(0, load - self.cap) for load in self.load)

    def start(self, prompt, params, reply):
        """Queue on the least loaded worker, wait for its batch to admit it -> the Job, or None (full or too long)."""
        with self.lock:
            worker = min(self.workers, key=lambda w: self.load[w.id])
            if self.load[worker.id] >= self.cap and self.waiting() >= self.max_queue:
                return None
            self.load[worker.id] += 1
        job = Job(prompt, params, reply, queue.Queue(), threading.Event(), worker)
        worker.inbox.put(job)
        try:
            admitted = job.out.get(timeout=QUEUE_WAIT_S)
        except queue.Empty:
            job.cancel.set()  # the worker drops it without decoding
            return None
        if isinstance(admitted, Exception):
            raise admitted
        return job

    def finish(self, worker):
        with self.lock:
            self.load[worker.id] -= 1

def job_pieces(job):
    for piece in iter(job.out.get, None):
        if isinstance(piece, Exception):
            raise piece
        yield piece

def until_stop(pieces, stops, reply):
    """The pieces up to the first stop string (finish 'stop'); a tail that may begin one waits for the next piece."""
    text, sent = "", 0
    for piece in pieces:
        text += piece
        cut = min([i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0], default=-1)
        if cut >= 0:
            reply.finish = "stop"
            if cut > sent:
                yield text[sent:cut]
            return
        held = max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        if len(text) - held > sent:
            yield text[sent:len(text) - held]
            sent = len(text) - held
    if len(text) > sent:
        yield text[sent:]

class GenerationError(RuntimeError):
    """One request's generation failed; its message is safe to show that request's client."""

def row_failure(e):
    traceback.print_exc()
    return GenerationError(f"generation failed for this request ({type(e).__name__}); other requests were not affected")

@torch.inference_mode()
def decode_loop(pool, worker):
    """Continuous batching: a step samples every active request (own settings, seed, tool state) and runs one batched
    forward; new requests join between steps, finished ones leave at once (the last row takes their cache row).
    Engine.generate is not used: its batch is fixed from the first step to the last."""
    engine, special = worker.engine, worker.engine.specials()
    kv, rows, logits = engine.cache(pool.cap, pool.context, ragged=True), [], None
    while True:
        try:
            while len(rows) < pool.cap:  # admit; block only when idle
                try:
                    job = worker.inbox.get(block=not rows)
                except queue.Empty:
                    break
                if job.cancel.is_set():
                    pool.finish(worker)
                    continue
                try:
                    rng = torch.Generator(device=engine.model.get_device()).manual_seed(job.params["seed"])
                    kv1, first = engine.prefill(job.prompt)
                except Exception as e:  # this request alone fails
                    pool.finish(worker)
                    job.out.put(row_failure(e))
                    continue
                rows.append((job, RowState(), rng))
                kv.prefill(kv1, row=len(rows) - 1)
                logits = first if len(rows) == 1 else torch.cat((logits, first))
                job.out.put(True)
            sampled, tokens, failed = [], [], {}  # failed: row -> the error that ends it; the other rows go on
            for i, (job, _, rng) in enumerate(rows):  # a sample even when forced: same rng use as alone
                try:
                    p = job.params
                    sampled.append(sample_next_token(logits[i:i + 1], rng, p["temperature"], p["top_k"] or None))
                except Exception as e:
                    failed[i] = row_failure(e)
                    sampled.append(torch.zeros(1, 1, dtype=torch.long, device=logits.device))
            for i, ((_, state, _), s) in enumerate(zip(rows, torch.cat(sampled).view(-1).tolist())):
                try:
                    tokens.append(0 if i in failed else engine.row_step(state, s, special)[0])
                except Exception as e:
                    failed[i] = row_failure(e)
                    tokens.append(0)
            for i in reversed(range(len(rows))):
                job, state, _ = rows[i]
                if i in failed:
                    pass
                elif state.completed:
                    job.reply.finish = "stop"
                elif not job.cancel.is_set():
                    job.reply.ids.append(tokens[i])
                    piece = job.reply.push(tokens[i])
                    if piece:
                        job.out.put(piece)
                if (i in failed or state.completed or job.cancel.is_set()
                        or len(job.reply.ids) >= job.params["max_tokens"]):
                    pool.finish(worker)
                    job.out.put(failed.get(i))
                    if i != len(rows) - 1:
                        kv.move_row(len(rows) - 1, i)
                        rows[i], tokens[i] = rows[-1], tokens[-1]
                    rows.pop(), tokens.pop()
            if rows:
                logits = engine.forward_last(torch.tensor(tokens, device=logits.device).view(-1, 1), kv)
        except Exception as e:  # a bug: every request in the batch ends with an error, the worker keeps serving
            traceback.print_exc()
            for job, _, _ in rows:
                pool.finish(worker)
                job.out.put(RuntimeError(f"generation failed: {type(e).__name__}"))
            rows = []

# -----------------------------------------------------------------------------
# HTTP: one handler for the page, the SSE endpoint, the OpenAI API, health and stats

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"         # keep-alive for sized answers; a stream ends by closing its connection
    default_request_version = "HTTP/1.0"  # so even answers to garbage request lines carry a status line
    timeout = 60                          # a client that stalls (or idles on keep-alive) for a minute is dropped

    def log_message(self, format, *args):  # one line per request is written by `_logged` instead
        pass

    def handle_one_request(self):  # Server.service_actions cuts the connection if the request is not in by its deadline
        self.server.deadlines[self.connection] = time.time() + REQUEST_DEADLINE_S
        super().handle_one_request()

    def send_error(self, code, message=None, explain=None):  # http.server's own errors (bad request line, 501) as JSON
        self.close_connection = True
        self.send_json(code, error_json(code, message or self.responses.get(code, ("error",))[0]))
        self.server.log(f"{self.client_address[0]} {code} {message or ''}")

    def send_headers(self, status, content_type, extra=None, length=None):
        self.status = status
        self.send_response(status)
        sized = {"Connection": "close"} if length is None else {"Content-Length": str(length)}
        self.close_connection = self.close_connection or length is None
        headers = {"Content-Type": content_type, "Access-Control-Allow-Origin": "*", "Cache-Control": "no-cache"}
        for k, v in {**headers, **sized, **(extra or {})}.items():
            self.send_header(k, v)
        self.end_headers()

    def send_json(self, status, obj, extra=None):
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_headers(status, "application/json; charset=utf-8", extra, len(body))
        self.wfile.write(body)

    def send_event(self, obj):
        text = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self.wfile.write(("data: " + text + "\n\n").encode("utf-8"))
        self.wfile.flush()

    def _logged(self, route):
        t0 = time.time()
        self.status, self.note = None, ""
        if self.command != "POST":  # no body to wait for (a POST's deadline ends in read_json_body)
            self.server.deadlines.pop(self.connection, None)
        try:
            route()
        except ApiError as e:
            self.note += e.message
            self.close_connection = True  # the body may be unread: never parse it as a next request
            self.send_json(e.status, error_json(e.status, e.message), e.headers)
        except (ConnectionError, TimeoutError):  # broken pipe, reset: the client went away
            self.note += " client disconnected"
        except Exception as e:  # a bug: log it here, answer 500 (or an error event mid-stream) with no trace, go on
            traceback.print_exc()
            self.note += f" internal error: {type(e).__name__}"
            self.close_connection = True
            message = str(e) if isinstance(e, GenerationError) else "internal server error"
            with contextlib.suppress(OSError):
                if self.status is None:
                    self.send_json(500, error_json(500, message))
                else:
                    self.send_event({"error": message})
        finally:
            self.server.log(f"{self.client_address[0]} {self.command} {self.path} {self.status} "
                            f"{time.time() - t0:.2f}s {' '.join(self.note.split())}")

    def do_GET(self):
        self._logged(self.route_get)

    def do_POST(self):
        self._logged(self.route_post)

    def do_OPTIONS(self):  # CORS preflight
        allow = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                 "Access-Control-Allow-Headers": "Content-Type, Authorization"}
        self._logged(lambda: self.send_headers(204, "text/plain", allow, 0))

    def route_get(self):
        app, pool, path = self.server.app, self.server.app.pool, self.path.split("?")[0]
        free = sum(load < pool.cap for load in pool.load)
        if path in ("/", "/index.html"):
            with open(UI_PATH, "rb") as f:
                body = f.read()
            self.send_headers(200, "text/html; charset=utf-8", length=len(body))
            self.wfile.write(body)
        elif path == "/health":
            num_gpus = sum(w.device.startswith("cuda") for w in pool.workers)
            self.send_json(200, {"status": "ok", "ready": True, "num_gpus": num_gpus, "available_workers": free,
                                 "model": app.model_id, "defaults": app.defaults, "limits": SAMPLING_LIMITS})
        elif path == "/stats":
            self.send_json(200, {"total_workers": len(pool.workers), "available_workers": free,
                                 "busy_workers": sum(load > 0 for load in pool.load), "batch_cap": pool.cap,
                                 "active_requests": sum(min(load, pool.cap) for load in pool.load),
                                 "waiting_requests": pool.waiting(), "max_queue": pool.max_queue,
                                 "workers": [{"gpu_id": w.id, "device": w.device} for w in pool.workers]})
        elif path == "/v1/models" or path.startswith("/v1/models/"):  # one model; any id asked for is this one
            card = {"id": app.model_id, "object": "model", "created": app.created, "owned_by": "nanochat"}
            self.send_json(200, card if path.startswith("/v1/models/") else {"object": "list", "data": [card]})
        else:
            raise ApiError(404, f"no such endpoint: GET {path}")

    def route_post(self):
        path = self.path.split("?")[0]
        if path not in ("/chat/completions", "/v1/chat/completions"):
            raise ApiError(404, f"no such endpoint: POST {path}")
        app = self.server.app
        data = read_json_body(self)
        messages = parse_messages(data)
        params = parse_sampling(data, app.defaults)
        context = app.pool.context
        system = messages[:1] if messages[0]["role"] == "system" else []  # always kept
        starts = [i for i, m in enumerate(messages) if m["role"] == "user" and i > len(system)][::-1] + [len(system)]
        prompts = (app.tokenizer.render_prompt(system + messages[i:], any_order=True) for i in starts)
        prompt, room, note = fit_context(prompts, [i - len(system) for i in starts], context, params["max_tokens"])
        if room < 1:
            raise ApiError(400, f"the last message needs {len(prompt)} tokens; the model's context is {context} tokens")
        note = {"note": note} if note else {}
        params["max_tokens"] = room
        job = app.pool.start(prompt, params, Reply(app.tokenizer))
        if job is None:
            raise ApiError(503, "all workers are busy and the queue is full; retry shortly", {"Retry-After": "2"})
        pieces = until_stop(job_pieces(job), params["stop"], job.reply) if params["stop"] else job_pieces(job)
        try:
            if path == "/chat/completions":
                self.send_headers(200, "text/event-stream; charset=utf-8")
                if note:
                    self.send_event(note)
                for piece in pieces:
                    self.send_event({"token": piece, "gpu": job.worker.id})
                self.send_event({"done": True})
            else:
                self.openai_response(data, pieces, job.reply, len(prompt), note)
        finally:
            job.cancel.set()  # a client that went away leaves the batch at the next step
            self.note = (f"worker={job.worker.id} prompt={len(prompt)} completion={len(job.reply.ids)} "
                         f"finish={job.reply.finish} {self.note}")

    def openai_response(self, data, pieces, reply, n_prompt, note):
        app, cid, created = self.server.app, "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        usage = lambda: {"prompt_tokens": n_prompt, "completion_tokens": len(reply.ids),
                         "total_tokens": n_prompt + len(reply.ids)}
        chunk = lambda choices, **kw: {"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": app.model_id, "choices": choices, **kw}
        if not data.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            self.send_json(200, {"id": cid, "object": "chat.completion", "created": created, "model": app.model_id,
                                 "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}],
                                 "usage": usage(), **note})
            return
        self.send_headers(200, "text/event-stream; charset=utf-8")
        self.send_event(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                              **note))
        for piece in pieces:
            self.send_event(chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        self.send_event(chunk([{"index": 0, "delta": {}, "finish_reason": reply.finish}]))
        if isinstance(data.get("stream_options"), dict) and data["stream_options"].get("include_usage"):
            self.send_event(chunk([], usage=usage()))
        self.send_event("[DONE]")

class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog, so bursts of connections are queued rather than refused

    def handle_error(self, request, client_address):  # a broken connection is one log line, not a traceback
        self.log(f"{client_address[0]} connection error: {sys.exc_info()[1]!r}")

    def process_request(self, request, client_address):  # beyond MAX_CONNECTIONS: 503 at once, without a thread
        if self.slots.acquire(blocking=False):
            return super().process_request(request, client_address)
        self.log(f"{client_address[0]} 503 over {MAX_CONNECTIONS} open connections")
        body = json.dumps(error_json(503, "too many open connections; retry shortly")).encode()
        with contextlib.suppress(OSError):
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 2\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        request.close()

    def shutdown_request(self, request):  # the end of a connection's thread: its slot is free again
        super().shutdown_request(request)
        self.slots.release()

    def service_actions(self):  # serve_forever calls this twice a second: cut requests still coming in past a deadline
        for conn, deadline in list(self.deadlines.items()):
            if time.time() > deadline and self.deadlines.pop(conn, None):
                with contextlib.suppress(OSError):  # a closed connection (its request was answered) raises here
                    conn.shutdown(socket.SHUT_RDWR)
                    self.log(f"request not in after {REQUEST_DEADLINE_S}s: connection closed")

def make_server(app, host, port, log):
    server = Server((host, port), Handler)
    server.app, server.log, server.deadlines, server.slots = app, log, {}, threading.BoundedSemaphore(MAX_CONNECTIONS)
    return server

# -----------------------------------------------------------------------------
# loading

_log_lock = threading.Lock()

def log_line(line):
    with _log_lock:  # whole lines, even from many request threads
        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip()}\n")
        sys.stderr.flush()

def worker_devices(device, num_gpus):
    """One worker per GPU when the device is plain 'cuda', else exactly one worker."""
    if device == "cuda":
        return [f"cuda:{i}" for i in range(num_gpus or torch.cuda.device_count())]
    return [device]

def batch_cap(model):
    """CPU: 32 rows (past that a step's cost grows with the rows); CUDA: the rows whose KV cache (k and v, 2 bytes each
    in bf16) fits in half the free memory."""
    config, device = model.config, model.get_device()
    if device.type != "cuda":
        return 32
    row_bytes = 4 * config.n_layer * config.n_kv_head * (config.n_embd // config.n_head) * config.sequence_len
    return int(max(1, min(256, torch.cuda.mem_get_info(device)[0] // 2 // row_bytes)))

def build_app(args, engines=None, model_id=None):
    """What the handlers read: an Engine per worker device on the checkpoint the flags name (or the bench's engines)."""
    if engines is None:
        tokenizer = get_tokenizer()
        devices = worker_devices(args.device or common.autodetect_device(), args.num_gpus if args.web else 1)
        models = [load_model(args.source, d, tag=args.tag, step=args.step, tokenizer=tokenizer)[0] for d in devices]
        engines = [Engine(model, tokenizer) for model in models]  # the models are in eval mode
        model_id = f"nanochat-{args.source}-{args.tag or 'd%d' % models[0].config.n_layer}"
    model = engines[0].model
    pool = WorkerPool(engines, args.max_queue, args.batch_cap or batch_cap(model), model.config.sequence_len)
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens or 512}
    return App(engines[0].tokenizer, pool, model_id, int(time.time()), defaults)

# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Chat with a nanochat model: CLI, web UI, OpenAI-compatible API.")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="stage to load")
    parser.add_argument("-g", "--tag", default=None, help="checkpoint tag such as d20 (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("-m", "--max-tokens", type=int, default=None, help="reply length limit (CLI 256, web 512)")
    parser.add_argument("--device", default=None, help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--web", action="store_true", help="serve the web UI and the APIs instead of the CLI")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    parser.add_argument("-n", "--num-gpus", type=int, default=0, help="web: GPUs to serve from (0 = all visible)")
    parser.add_argument("--max-queue", type=int, default=32, help="web: requests that may wait for a batch before 503")
    parser.add_argument("--batch-cap", type=int, default=0, help="web: requests decoded together (0 = fit the device)")
    parser.add_argument("--bench", action="store_true", help="time to first token and tok/s, 1, 8, 32 streams at once")
    args = parser.parse_args()
    for key, (lo, hi) in SAMPLING_LIMITS.items():  # -t, -k and -m
        value = getattr(args, key)
        if value is not None and not lo <= value <= hi:
            parser.error(f"--{key.replace('_', '-')} must be {lo:g}..{hi:g}, not {value:g}")
    if args.batch_cap < 0:
        parser.error("--batch-cap must be >= 1 (or 0 for the device's default)")
    if not 0 <= args.port <= 65535:
        raise common.UserError(f"--port must be 0..65535 (0 = any free port), not {args.port}")
    if args.prompt is not None and not args.prompt.strip():
        raise common.UserError("-p/--prompt is empty: give the text to answer, or leave -p out to chat")
    if args.bench:
        return bench(args)
    app = build_app(args)
    if not args.web:
        return chat_cli(args, app.tokenizer, app.pool.workers[0].engine, app.pool.context)
    try:
        server = make_server(app, args.host, args.port, log_line)
    except OSError as e:
        raise common.UserError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    host, port = server.server_address[:2]
    print(f"serving {app.model_id} with {len(app.pool.workers)} worker(s) on http://{host}:{port}/ "
          f"(OpenAI API at http://{host}:{port}/v1)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()

# -----------------------------------------------------------------------------
# benchmarks

class BenchChatTokenizer(BenchTokenizer):
    """model.py's bench tokenizer (no trained one needed) with the chat format, whose renderer needs only encode*."""
    render_conversation, render_prompt = Tokenizer.render_conversation, Tokenizer.render_prompt

def bench_stream(port, max_tokens):
    """One streamed /v1 request -> (time to first token, completion tokens, decode time after the first token)."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story about the sea."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 1.0, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0, first, tokens = time.time(), None, 0
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    for line in conn.getresponse():
        event = json.loads(line[6:]) if line.startswith(b"data: {") else {}
        if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
            first = time.time() - t0
        tokens = event["usage"]["completion_tokens"] if event.get("usage") else tokens
    return first or 0.0, tokens, time.time() - t0 - (first or 0.0)

def bench(args, max_tokens=128):
    """The real server on a free port, timed through HTTP like a client: 1 stream, then 8 and 32 concurrent ones."""
    try:
        app = build_app(args)
    except FileNotFoundError:  # no checkpoint: time a random-init depth-4 model, as model.py's bench does
        torch.manual_seed(0)
        device = worker_devices(args.device or common.autodetect_device(), 1)[0]
        model = build_model(asdict(config_from_depth(4, 65536, 512)), device).eval()
        app = build_app(args, [Engine(model, BenchChatTokenizer(65536))], "random-init-d4")
    server = make_server(app, "127.0.0.1", 0, log=lambda line: None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    bench_stream(port, 8)  # warm-up
    print(f"{app.model_id} on {app.pool.workers[0].device}, {len(app.pool.workers)} worker(s) of up to "
          f"{app.pool.cap} rows, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f} "
          "before (a shared machine: figures move with the load)")
    for n in (1, 8, 32):
        t0 = time.time()
        with ThreadPoolExecutor(n) as streams:
            results = list(streams.map(lambda _: bench_stream(port, max_tokens), range(n)))
        wall, ttft, tokens = time.time() - t0, sorted(r[0] for r in results), sum(r[1] for r in results)
        per_stream = sum(r[1] / max(r[2], 1e-9) for r in results) / n
        print(f"{n:2d} stream(s): time to first token p50 {ttft[n // 2] * 1000:.0f} ms, "
              f"p95 {ttft[min(n - 1, int(0.95 * n))] * 1000:.0f} ms; {tokens} tokens in {wall:.2f} s = "
              f"{tokens / wall:.1f} tok/s overall, {per_stream:.1f} tok/s per stream once started")
    server.shutdown()

if __name__ == "__main__":
    common.run_main(main)
