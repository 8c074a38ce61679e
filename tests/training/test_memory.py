"""Heap trimming during a training step: when it trims, that it never changes the math."""

import pytest
import torch
from steer.training.distributed import DistContext
from steer.training.memory import HeapTrimmer, decoder_layers, glibc
from steer.training.pairs import Encoder, encode_examples, read_examples
from steer.training.policy import build_policy
from steer.training.settings import DPOConfig
from steer.training.trainer import PreferenceTrainer

ROWS = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i} way, never."} for i in range(4)]


class FakeLibc:
    """malloc_trim counts its calls."""

    def __init__(self):
        self.calls = 0

    def malloc_trim(self, pad):
        assert pad == 0
        self.calls += 1
        return 1


class GrowingRSS:
    """A resident size that grows by ``step`` bytes at every reading."""

    def __init__(self, step: int):
        self.step, self.now = step, 10**9

    def __call__(self):
        self.now += self.step
        return self.now


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    import json

    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def make(**overrides):
        config = DPOConfig(output=str(tmp_path / "run"), data=(str(data_file),), model=str(tiny_model_dir),
                           batch_size=4, progress=False, lr=1e-2, **overrides)
        policy = build_policy(config.policy_spec())
        data = encode_examples(read_examples(config.data), Encoder(policy.tokenizer, 128, 96))
        return config, policy, data
    return make


def test_trims_when_resident_memory_grew_past_the_limit(setup):
    config, policy, data = setup()
    layers = decoder_layers(policy.model)
    assert len(layers) == policy.base_model.config.num_hidden_layers == 2
    trainer = PreferenceTrainer(config, policy, DistContext(), total_steps=1)
    trainer.trimmer.remove()
    for growth, limit in ((0, 1000), (5000, 1000), (400, 1000)):
        fake = FakeLibc()
        trimmer = HeapTrimmer(policy.model, limit_bytes=limit, libc=fake, resident=GrowingRSS(growth))
        loss = trainer.micro_batch_loss(data, [0, 1, 2, 3]).loss  # outside active(): hooks do nothing
        loss.backward()
        assert fake.calls == 0
        with trimmer.active():
            loss = trainer.micro_batch_loss(data, [0, 1, 2, 3]).loss
            forward_calls = fake.calls
            loss.backward()
        trimmer.remove()
        # Hooks: after each layer's forward in the reference pass and in the policy pass, and once
        # before each layer's backward (the checkpointed recompute runs inside the layer's forward,
        # outside its module hooks, so it adds none): 3 per layer.
        if growth == 0:
            assert fake.calls == 1  # the first hook sets the floor; nothing grows after it
        elif growth > limit:
            assert forward_calls == 2 * len(layers) and fake.calls == 3 * len(layers)  # every hook
        else:
            # The first hook trims (no floor yet); after it, readings grow 400 per hook and the
            # fourth hook sees 1200 > 1000 since the floor: 2 trims in 6 hooks.
            assert fake.calls == 2
        assert trimmer.trims == fake.calls


@pytest.mark.skipif(glibc() is None, reason="needs glibc >= 2.33")
def test_release_memory_changes_nothing_numeric(setup):
    results = []
    for release in (False, True):
        config, policy, data = setup(release_memory=release)
        trainer = PreferenceTrainer(config, policy, DistContext(), total_steps=2)
        assert (trainer.trimmer is not None) == release
        if release:
            trainer.trimmer.limit = -1  # trim at every hook, so the step really runs through them
        losses = [trainer.train_step(data, [[0, 1, 2, 3]])["loss"] for _ in range(2)]
        results.append((losses, {n: p.detach().clone() for n, p in policy.named_trainable()}))
        if release:
            assert trainer.trimmer.trims > 0
    (l0, w0), (l1, w1) = results
    assert l0 == l1
    for name in w0:
        torch.testing.assert_close(w0[name], w1[name], rtol=0, atol=0)
