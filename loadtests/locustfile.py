"""Locust load test for a steer gRPC server.

Each simulated user keeps one channel and sends unary ``Generate`` and streaming
``GenerateStream`` calls with a random prompt and a random objective mix (a point drawn uniformly
from the simplex, sometimes a corner). Streams are reported as two entries: time to first token
and total time.

Run headless against a server you started (or use `make loadtest`, which starts one):
  locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 60s --host 127.0.0.1:50051 --csv out/steer

Environment: STEER_MAX_NEW_TOKENS (default 32), STEER_AUTH_TOKEN (sent as a bearer token).
"""

from __future__ import annotations

import os
import random
import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task

from steer.v1 import steer_pb2 as pb
from steer.v1 import steer_pb2_grpc

grpc_gevent.init_gevent()  # make gRPC's blocking calls cooperate with locust's gevent loop

OBJECTIVES = ("helpfulness", "creativity", "conciseness")
PROMPTS = (
    "Explain how a bicycle gear works.",
    "Write a short poem about autumn leaves.",
    "What are three tips for learning a new language?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do vaccines train the immune system?",
    "Give me a creative name for a coffee shop run by cats.",
    "What is the difference between weather and climate?",
    "Describe a sunrise to someone who has never seen one.",
)
MAX_NEW_TOKENS = int(os.environ.get("STEER_MAX_NEW_TOKENS", "32"))


def random_weights(rng: random.Random) -> dict[str, float]:
    if rng.random() < 0.2:
        return {rng.choice(OBJECTIVES): 1.0}
    draws = [rng.expovariate(1.0) for _ in OBJECTIVES]  # normalised exponentials: uniform on the simplex
    return {name: d / sum(draws) for name, d in zip(OBJECTIVES, draws)}


def fire(environment, name: str, started: float, length: int, exception: BaseException | None) -> None:
    environment.events.request.fire(
        request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
        response_length=length, exception=exception, context={},
    )


class SteerUser(User):
    wait_time = between(0.05, 0.2)

    def on_start(self):
        self.rng = random.Random()
        self.channel = grpc.insecure_channel(self.host or "127.0.0.1:50051")
        self.stub = steer_pb2_grpc.SteerStub(self.channel)
        token = os.environ.get("STEER_AUTH_TOKEN")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def on_stop(self):
        self.channel.close()

    def request(self) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt=self.rng.choice(PROMPTS), weights=random_weights(self.rng),
            sampling=pb.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.7, seed=self.rng.randrange(2**32)),
        )

    @task(1)
    def generate(self):
        started = time.perf_counter()
        try:
            reply = self.stub.Generate(self.request(), timeout=300, metadata=self.metadata)
        except grpc.RpcError as e:
            fire(self.environment, "Generate", started, 0, e)
            return
        fire(self.environment, "Generate", started, reply.usage.completion_tokens, None)

    @task(1)
    def generate_stream(self):
        started = time.perf_counter()
        first = None
        tokens = 0
        try:
            for chunk in self.stub.GenerateStream(self.request(), timeout=300, metadata=self.metadata):
                if first is None and chunk.delta:
                    first = time.perf_counter()
                    fire(self.environment, "GenerateStream ttft", started, 0, None)
                if chunk.finish_reason:
                    tokens = chunk.usage.completion_tokens
        except grpc.RpcError as e:
            fire(self.environment, "GenerateStream total", started, 0, e)
            return
        fire(self.environment, "GenerateStream total", started, tokens, None)


@events.quitting.add_listener
def _exit_code(environment, **kwargs):
    if environment.stats.total.fail_ratio > 0:
        environment.process_exit_code = 1
