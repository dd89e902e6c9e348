"""A real OpenAI-compatible server on 127.0.0.1, and faults put around it.

- `TransformersServe(model_dir)`: `transformers serve` (of the pinned transformers; its extra packages
  are in requirements-dev.txt) serving one model folder on the CPU, started as its own process. It
  answers /v1/chat/completions with an image as a data URL, always as a stream of server-sent events,
  and reports no token usage. It loads the model at the first request, and several first requests at
  once each load it (accelerate's meta-device init, global, then fails in all but one): `start()`
  sends one request before it returns. `kill()` ends it with SIGKILL (a server lost mid-run); `start()`
  again on the same port. Its /v1/models lists a fixed catalogue of hub names, not the served folder.
  Requests run concurrently in threads of one process: correct for LLaVA, but not for Qwen2-VL, whose
  model keeps per-request state (rope_deltas) on the module, so concurrent answers mix.
- `FaultProxy(upstream)`: an asyncio proxy (Starlette on uvicorn, httpx to the upstream) in front of
  it. For every other request body (by hash): the first arrival gets 429 with `Retry-After`, the second
  is cut off in the middle of its answer, the third goes through. A third of the answers asked for
  whole (`"stream": false`) are gathered into one JSON answer, as vLLM gives it, with a made-up usage
  (`usage`) the test can add up; the rest pass the server's stream through. A request whose image has
  pixels listed in `refuse` (`pixels()`) gets 400, as a content filter answers; one listed in `fail`
  gets 500, every time. `arrivals`, `bodies` and `auth` record what came in.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

RETRY_AFTER = 1  # s, in the proxy's 429 answers


def free_port() -> int:
    """A port nothing listens on (yet) at 127.0.0.1."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def png_data_url(img) -> str:
    """A PIL image as the data URL of a lossless PNG."""
    buf = io.BytesIO()
    img.save(buf, 'PNG')
    return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def pixels(img) -> str:
    """What identifies a picture, however it was encoded: the sha1 of its RGB pixels and size."""
    return hashlib.sha1(f'{img.size}'.encode() + img.convert('RGB').tobytes()).hexdigest()


def body_key(body: dict) -> str:
    """What identifies a request across its retries: the sha1 of its messages."""
    return hashlib.sha1(json.dumps(body['messages'], sort_keys=True).encode()).hexdigest()


class TransformersServe:
    """`transformers serve --force_model <model_dir> --device cpu` on 127.0.0.1, one thread of torch math
    (the same floats as the tests' in-process reference)."""

    def __init__(self, model_dir: Path, log: Path):
        self.model_dir, self.log, self.port, self.proc = Path(model_dir), Path(log), free_port(), None

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}/v1'

    def start(self, timeout: float = 180) -> TransformersServe:
        cli = Path(sys.executable).with_name('transformers')
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                [str(cli), 'serve', '--host', '127.0.0.1', '--port', str(self.port), '--force_model',
                 str(self.model_dir), '--device', 'cpu', '--model_timeout', '3600', '--log_level', 'warning'],
                env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f'http://127.0.0.1:{self.port}/health', timeout=2).status_code == 200:
                    return self.warm_up()
            time.sleep(0.3)
        raise TimeoutError(f'no answer in {timeout} s: {self.log.read_text()[-3000:]}')

    def warm_up(self) -> TransformersServe:
        """One request, which loads the model."""
        from PIL import Image

        image = {'type': 'image_url', 'image_url': {'url': png_data_url(Image.new('RGB', (32, 32), 'gray'))}}
        body = {'model': str(self.model_dir), 'max_tokens': 1, 'temperature': 0,
                'messages': [{'role': 'user', 'content': [image, {'type': 'text', 'text': 'Hi.'}]}]}
        r = httpx.post(f'{self.url}/chat/completions', json=body, timeout=120)
        assert r.status_code == 200, (r.status_code, r.text[:500], self.log.read_text()[-3000:])
        return self

    def kill(self) -> None:
        """SIGKILL to the server's process group: no answer finishes, no connection closes cleanly."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> TransformersServe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


class FaultProxy:
    """The proxy of the module docstring, on 127.0.0.1 (a uvicorn server in a thread of this process)."""

    def __init__(self, upstream: str, refuse: set[str] = frozenset(), fail: set[str] = frozenset()):
        self.upstream, self.refuse, self.fail, self.port = upstream, set(refuse), set(fail), free_port()
        self.arrivals: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)  # key: (t, answer)
        self.usage: dict[str, dict] = {}  # key: the usage of its whole answer that went out complete
        self.bodies: dict[str, dict] = {}  # key: the request
        self.auth: set[str] = set()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}/v1'

    async def _chat(self, request):
        from starlette.responses import Response, StreamingResponse

        raw = await request.body()
        body = json.loads(raw)
        key = body_key(body)
        self.bodies[key] = body
        self.auth.add(request.headers.get('authorization', ''))
        faulty, n = int(key, 16) % 2 == 0, len(self.arrivals[key]) + 1
        from PIL import Image

        urls = [c['image_url']['url'] for c in body['messages'][0]['content'] if c['type'] == 'image_url']
        sent = {pixels(Image.open(io.BytesIO(base64.b64decode(u.split(',', 1)[1])))) for u in urls}
        if sent & self.refuse:
            self.arrivals[key].append((time.time(), '400'))
            return Response(json.dumps({'error': {'message': 'this image is not allowed'}}), status_code=400,
                            media_type='application/json')
        if sent & self.fail:
            self.arrivals[key].append((time.time(), '500'))
            return Response('{"error": "internal error"}', status_code=500, media_type='application/json')
        if faulty and n == 1:
            self.arrivals[key].append((time.time(), '429'))
            return Response('{"error": "slow down"}', status_code=429, media_type='application/json',
                            headers={'Retry-After': str(RETRY_AFTER)})
        async with httpx.AsyncClient(timeout=300) as client:
            up = await client.post(f'{self.upstream}/chat/completions', content=raw,
                                   headers={'content-type': 'application/json'})
        if up.status_code != 200:
            self.arrivals[key].append((time.time(), str(up.status_code)))
            return Response(up.content, status_code=up.status_code, media_type=up.headers.get('content-type'))
        payload, media = up.content, 'text/event-stream'
        if int(key, 16) % 3 == 0 and not body.get('stream'):
            payload, usage = self._whole(up.text)
            media = 'application/json'
        if faulty and n == 2:
            self.arrivals[key].append((time.time(), 'cut'))

            async def cut_short():
                yield payload[:len(payload) // 2]
                raise ConnectionAbortedError('the test proxy cuts this answer short')
            return StreamingResponse(cut_short(), media_type=media)
        self.arrivals[key].append((time.time(), 'whole' if media == 'application/json' else 'stream'))
        if media == 'application/json':
            self.usage[key] = usage
        return Response(payload, media_type=media)

    @staticmethod
    def _whole(stream: str) -> tuple[bytes, dict]:
        """A server-sent event stream as one chat.completion answer, with a usage that counts its chunks."""
        events = [json.loads(line[5:]) for line in stream.splitlines() if line.startswith('data:')]
        text = ''.join(c['delta'].get('content') or '' for e in events for c in e['choices'])
        finish = next(c['finish_reason'] for e in events for c in e['choices'] if c.get('finish_reason'))
        usage = {'prompt_tokens': 100 + len(text), 'completion_tokens': len(events),
                 'total_tokens': 100 + len(text) + len(events)}
        answer = {'id': events[0]['id'], 'object': 'chat.completion', 'model': events[0]['model'],
                  'choices': [{'index': 0, 'message': {'role': 'assistant', 'content': text},
                               'finish_reason': finish}], 'usage': usage}
        return json.dumps(answer).encode(), usage

    async def _models(self, request):
        from starlette.responses import Response

        async with httpx.AsyncClient(timeout=30) as client:
            up = await client.get(f'{self.upstream}/models')
        return Response(up.content, status_code=up.status_code, media_type='application/json')

    def start(self) -> FaultProxy:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        app = Starlette(routes=[Route('/v1/chat/completions', self._chat, methods=['POST']),
                                Route('/v1/models', self._models)])
        config = uvicorn.Config(app, host='127.0.0.1', port=self.port, log_level='critical')
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class BatchingServer:
    """A stand-in for a batching serving engine, without a model (benchmarks/bench_caption_images.py
    --engine openai): a request needs 16..48 decode steps (from the hash of its body); every `step` s the
    server advances up to `slots` requests by one token each, as continuous batching does, so that its
    throughput grows with the requests in flight up to `slots`, and the slowest request of a batch of
    requests holds up a client that waits for the whole batch. It answers whole (JSON, with usage), or as
    server-sent events when asked to stream. Runs in its own process: `python openai_server.py PORT`."""

    def __init__(self, step: float = 0.05, slots: int = 256):
        self.step, self.slots, self.active = step, slots, []

    async def _chat(self, request):
        import asyncio

        from starlette.responses import JSONResponse, Response

        body = await request.json()
        digest = body_key(body)
        tokens = 16 + int(digest, 16) % 33
        done = asyncio.get_running_loop().create_future()
        self.active.append([tokens, done])
        await done
        usage = {'prompt_tokens': 300, 'completion_tokens': tokens, 'total_tokens': 300 + tokens}
        text, model = f'A picture {digest[:tokens // 4]}.', body['model']
        if body.get('stream'):
            events = [{'model': model, 'choices': [{'index': 0, 'delta': {'content': text}}]},
                      {'model': model, 'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}],
                       'usage': usage}]
            return Response(''.join(f'data: {json.dumps(e)}\n\n' for e in events) + 'data: [DONE]\n\n',
                            media_type='text/event-stream')
        return JSONResponse({'object': 'chat.completion', 'model': model, 'usage': usage, 'choices': [
            {'index': 0, 'message': {'role': 'assistant', 'content': text}, 'finish_reason': 'stop'}]})

    async def _steps(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self.step)
            for item in self.active[:self.slots]:
                item[0] -= 1
                if item[0] == 0 and not item[1].done():  # (done: its client went away)
                    item[1].set_result(None)
            self.active = [item for item in self.active if item[0] > 0]

    async def _models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({'object': 'list', 'data': [{'id': 'stand-in', 'object': 'model'}]})

    def run(self, port: int) -> None:
        import asyncio
        import contextlib as cl

        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        @cl.asynccontextmanager
        async def lifespan(app):
            task = asyncio.create_task(self._steps())
            yield
            task.cancel()

        app = Starlette(routes=[Route('/v1/chat/completions', self._chat, methods=['POST']),
                                Route('/v1/models', self._models)], lifespan=lifespan)
        uvicorn.run(app, host='127.0.0.1', port=port, log_level='warning', backlog=4096)


if __name__ == '__main__':
    BatchingServer(float(sys.argv[2]) if len(sys.argv) > 2 else 0.05).run(int(sys.argv[1]))
