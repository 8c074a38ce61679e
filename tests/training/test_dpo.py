"""DPO-family training on the tiny model: fused log-probs equal the naive ones, every loss's first
value equals ``preference_loss`` on naive log-probs with the base model as reference, training
moves the weights, and the CLI writes an adapter that transformers + peft and steer load."""

import json
import math

import pytest
import torch
from steer.kernels import preference_loss
from steer.training.distributed import DistContext
from steer.training.dpo import prepare_examples
from steer.training.logprobs import sequence_logprobs
from steer.training.pairs import IGNORE_INDEX, Encoder, collate, encode_examples, read_examples
from steer.training.policy import build_policy
from steer.training.settings import DPOConfig
from steer.training.trainer import PreferenceTrainer

PAIRS = [
    {"prompt": "Name a colour.", "chosen": "Blue.",
     "rejected": "I would rather talk about the weather today, it is nice."},
    {"prompt": [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris"}],
     "rejected": [{"role": "assistant", "content": "It is a city in Europe, maybe Lyon."}]},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Goodbye forever, friend."},
    {"prompt": "Count to three.", "chosen": "1, 2, 3", "rejected": "one two"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", PAIRS)


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    rows = []
    for p in PAIRS:
        rows += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                 {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]
    return write_jsonl(tmp_path_factory.mktemp("data") / "kto.jsonl", rows)


def naive_logps(model, batch):
    """Independent reference: the model's own forward (full logits), log_softmax, gather, mask."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    tok = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(1), mask.sum(1)


def test_fused_equals_naive_on_a_padded_batch_with_masked_prompts(tiny_model_dir, tokenizer):
    from steer.training.policy import PolicySpec

    policy = build_policy(PolicySpec(model=str(tiny_model_dir), seed=1))
    _perturb_adapter(policy)
    enc = Encoder(tokenizer, 128, 96)
    seqs = [enc.encode(({"role": "user", "content": p}, ), c) for p, c in
            [("Hi", "Hello there, how are you doing today?"), ("A much longer prompt with many words in it", "ok"),
             ("Q", "A")]]
    batch = collate(seqs, tokenizer.pad_token_id)
    assert len({len(s.input_ids) for s in seqs}) >= 2 and (batch.attention_mask == 0).any()  # really padded
    fused = sequence_logprobs(policy.model, batch, impl="fused")
    fused.logps.sum().backward()
    grads_fused = {n: p.grad.clone() for n, p in policy.named_trainable()}
    policy.model.zero_grad()
    naive = sequence_logprobs(policy.model, batch, impl="naive")
    naive.logps.sum().backward()
    independent, counts = naive_logps(policy.model, batch)
    torch.testing.assert_close(fused.logps, naive.logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused.logps, independent, rtol=1e-5, atol=1e-4)
    assert fused.counts.tolist() == counts.tolist() == [s.completion_len for s in seqs]
    for n, p in policy.named_trainable():
        # fp32 sums of ~100 per-token terms, reduced in different orders: absolute error scales with
        # the gradient's magnitude, so the tolerance is relative to the largest entry.
        scale = float(p.grad.abs().max())
        assert scale > 0, n
        torch.testing.assert_close(grads_fused[n], p.grad, rtol=1e-4, atol=1e-4 * scale)


def _perturb_adapter(policy, seed=0, std=0.05):
    """LoRA starts with B = 0 (policy == reference), where every reference-based loss is log 2 or
    another constant; a random B makes the step-0 comparison meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_trainable():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _naive_loss(config, policy, base, data):
    """preference_loss (or NLL for sft) from naive log-probs; reference = the freshly loaded base model."""
    pad = policy.tokenizer.pad_token_id
    beta = config.effective_beta
    with torch.no_grad():
        if config.loss == "sft":
            lp, n = naive_logps(policy.model, collate([e.sequences[0] for e in data], pad))
            return float(-lp.sum() / n.sum())
        if config.loss == "kto":
            main = collate([e.sequences[0] for e in data], pad)
            kl = collate([e.sequences[1] for e in data], pad)
            (pol, _), (ref, _) = naive_logps(policy.model, main), naive_logps(base, main)
            (kl_pol, _), (kl_ref, _) = naive_logps(policy.model, kl), naive_logps(base, kl)
            good = torch.tensor([e.label for e in data])
            return preference_loss(pol[good], pol[~good], ref[good], ref[~good], loss_type="kto", beta=beta,
                                   kl_policy_logps=kl_pol, kl_ref_logps=kl_ref).loss.item()
        b = len(data)
        batch = collate([e.sequences[0] for e in data] + [e.sequences[1] for e in data], pad)
        (pol, n), (ref, _) = naive_logps(policy.model, batch), naive_logps(base, batch)
        loss = preference_loss(pol[:b], pol[b:], ref[:b], ref[b:], loss_type=config.loss, beta=beta,
                               chosen_lengths=n[:b], rejected_lengths=n[b:], gamma=config.effective_gamma).loss.item()
        # RPO: plus alpha x the chosen responses' token-mean NLL under the policy
        return loss + config.rpo_alpha * float(-pol[:b].sum() / n[:b].sum())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto", "sft", "sigmoid+rpo"])
def test_each_loss_matches_naive_at_step_0_and_trains(loss, tmp_path, tiny_model_dir, pairs_file, kto_file):
    from transformers import AutoModelForCausalLM

    data_file = kto_file if loss == "kto" else pairs_file
    loss, _, rpo = loss.partition("+")
    # fp32 against the naive fp32 reference on every machine (auto would be bf16 where the CPU has
    # native bf16; that step is checked against this one in test_bf16_step_matches_the_fp32_step).
    config = DPOConfig(output=str(tmp_path), data=(str(data_file),), model=str(tiny_model_dir), loss=loss,
                       batch_size=len(PAIRS) * (2 if loss == "kto" else 1), lr=2e-2, progress=False,
                       lr_schedule="constant", precision="fp32", rpo_alpha=0.5 if rpo else 0.0)
    policy = build_policy(config.policy_spec())
    _perturb_adapter(policy)
    data = encode_examples(prepare_examples(config, read_examples(config.data)), Encoder(policy.tokenizer, 128, 96),
                           sft=loss == "sft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = _naive_loss(config, policy, base, data)

    trainer = PreferenceTrainer(config, policy, DistContext(), total_steps=4)
    before = {n: p.detach().clone() for n, p in policy.named_trainable()}
    everything = [list(range(len(data)))]
    losses = [trainer.train_step(data, everything)["loss"] for _ in range(4)]
    assert losses[0] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # four steps on one batch lower its loss
    assert any(not torch.equal(before[n], p) for n, p in policy.named_trainable())
    # The base weights (the reference) never move under LoRA.
    for name, p in policy.model.named_parameters():
        if not p.requires_grad:
            assert "lora_" not in name


def test_full_finetuning_uses_precomputed_reference(tmp_path, tiny_model_dir, pairs_file):
    from steer.training.dpo import REFERENCE_FILE, train_dpo
    from steer.training.metrics import read_metrics
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    train_dpo(DPOConfig(output=str(out), data=(str(pairs_file),), model=str(tiny_model_dir), full=True,
                        batch_size=2, lr=1e-3, epochs=2, progress=False))
    records = read_metrics(out)
    steps = [r for r in records if r["type"] == "step"]
    assert records[0]["reference"] == "precomputed" and len(steps) == 4
    # At step 0 policy == reference, so DPO's loss is log 2 (up to padding-dependent float noise).
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    ref = torch.load(out / REFERENCE_FILE, weights_only=True)["logps"]
    assert ref.shape == (len(PAIRS), 2) and torch.isfinite(ref).all()
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_cli_writes_a_standard_adapter_that_steer_and_peft_load(tmp_path, tiny_model_dir, pairs_file):
    from peft import PeftModel
    from steer.training.dpo_cli import main
    from transformers import AutoModelForCausalLM

    from steer.models import load_model

    out = tmp_path / "run"
    assert main(["--data", str(pairs_file), "--model", str(tiny_model_dir), "--output", str(out), "--batch-size", "2",
                 "--lr", "5e-2", "--no-progress", "--lora-target", "q_proj,v_proj", "--lora-r", "4"]) == 0
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve()) and config["r"] == 4
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                      str(adapter)).eval()
    served = load_model(str(tiny_model_dir), adapter=str(adapter))  # what `steer.serve --adapter` does
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        a, b, c = plain(input_ids=ids).logits, served.model(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 1e-3  # the adapter changed the model
    for name in ("metrics.jsonl", "training_curve.png", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    # The saved config reproduces the run's settings.
    from steer.training.config import read_config_file

    assert read_config_file(DPOConfig, out / "config.yaml")["lora_target"] == "q_proj,v_proj"


def test_cli_bad_data_row_and_wrong_format_stop_with_location(tmp_path, tiny_model_dir, kto_file, capsys):
    from steer.training.dpo_cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    common = ["--model", str(tiny_model_dir), "--no-progress"]
    assert main(["--data", str(bad), "--output", str(tmp_path / "a"), *common]) == 2
    assert f"{bad}:2: rejected: is missing" in capsys.readouterr().err
    assert main(["--data", str(kto_file), "--output", str(tmp_path / "b"), "--loss", "sigmoid", *common]) == 2
    assert "loss: 'sigmoid' needs preference pairs" in capsys.readouterr().err
    assert main(["--data", str(kto_file), "--output", str(tmp_path / "c"), "--batch-size", "64", "--loss", "kto",
                 *common]) == 2
    assert "batch_size: 8 examples cannot fill one global batch of 64" in capsys.readouterr().err
    # Refused runs, even one refused after the model was loaded, leave no output directory behind.
    assert not any((tmp_path / name).exists() for name in "abc")


def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny_model_dir, pairs_file):
    results = []
    for checkpointing in (False, True):
        config = DPOConfig(output=str(tmp_path), data=(str(pairs_file),), model=str(tiny_model_dir), batch_size=4,
                           lr=1e-2, progress=False, gradient_checkpointing=checkpointing)
        policy = build_policy(config.policy_spec())
        _perturb_adapter(policy)
        layers = policy.base_model.model.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        data = encode_examples(read_examples(config.data), Encoder(policy.tokenizer, 128, 96))
        trainer = PreferenceTrainer(config, policy, DistContext(), total_steps=1)
        loss = trainer.micro_batch_loss(data, [0, 1, 2, 3]).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in policy.named_trainable()}))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-7)


def test_epochs_are_padded_to_whole_global_batches(tmp_path, tiny_model_dir, pairs_file):
    from steer.training.trainer import epoch_order

    config = DPOConfig(output=str(tmp_path), data=(str(pairs_file),), model=str(tiny_model_dir), batch_size=3, seed=4,
                       progress=False)
    trainer = PreferenceTrainer(config, build_policy(config.policy_spec()), DistContext(), total_steps=4)
    seen = []
    trainer.train_step = lambda data, micro: seen.append(micro) or {"loss": 0.0}  # record batches, skip the maths
    assert trainer.fit([None] * 4, epochs=2) == 4
    for epoch in range(2):
        order = epoch_order(4, 4, epoch)
        batches = [mb for step in seen[2 * epoch: 2 * epoch + 2] for mb in step]
        assert batches == [order[:3], order[3:] + order[:2]]  # every example once, then the epoch's first ones again


def test_precision_auto_follows_native_bf16_and_bad_values_are_named(monkeypatch, tmp_path, pairs_file):
    from steer.training import trainer as trainer_module

    from steer.errors import InvalidInput

    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(trainer_module, "bf16_native", lambda device, native=native: native)
        assert trainer_module.resolve_precision("auto", cpu) == expected
        assert trainer_module.resolve_precision("fp32", cpu) == "fp32"  # explicit wins either way
        assert trainer_module.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(InvalidInput, match="precision"):
        DPOConfig(output=str(tmp_path), data=(str(pairs_file),), precision="fp16")


def test_bf16_step_matches_the_fp32_step(tmp_path, tiny_model_dir, pairs_file):
    """bf16 autocast (decoder matmuls in bf16; LoRA weights, log-probs and loss in fp32) against the
    all-fp32 step, on an adapter perturbed so that policy != reference.

    Tolerance: bf16 keeps 8 significant bits, so each matmul output carries a relative rounding
    error of up to 2^-9 = 0.2%; summed over ~10 completion tokens of log-probs near -11 (random
    tiny model, vocab 49k) that is ~0.1-0.3 nats per sequence, and the policy and the reference see
    the *same* rounding of the shared base weights, so the DPO logit (a difference of differences)
    keeps most of its precision. We allow 0.02 on the loss (log 2 = 0.69 at the start) and a
    gradient direction within cosine 0.99 and norm within 5% of fp32's, per parameter tensor."""
    results = {}
    for precision in ("fp32", "bf16"):
        config = DPOConfig(output=str(tmp_path), data=(str(pairs_file),), model=str(tiny_model_dir), batch_size=4,
                           progress=False, precision=precision)
        policy = build_policy(config.policy_spec())
        _perturb_adapter(policy)
        data = encode_examples(read_examples(config.data), Encoder(policy.tokenizer, 128, 96))
        trainer = PreferenceTrainer(config, policy, DistContext(), total_steps=1)
        assert trainer.precision == precision
        result = trainer.micro_batch_loss(data, [0, 1, 2, 3])
        result.loss.backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for _, p in policy.named_trainable())
        results[precision] = (result.loss.item(), result.metrics,
                              {n: p.grad.clone() for n, p in policy.named_trainable()})
    (l32, m32, g32), (l16, m16, g16) = results["fp32"], results["bf16"]
    assert abs(l32 - math.log(2)) > 0.01, (
        "the perturbed adapter must move the loss off log 2, or the comparison is empty")
    assert l16 == pytest.approx(l32, abs=0.02)
    assert m16["logps/chosen"] != m32["logps/chosen"], "bf16 ran nothing in bf16"
    for name in g32:
        a, b = g32[name].flatten(), g16[name].flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99, name
        assert b.norm() == pytest.approx(a.norm().item(), rel=0.05), name


def test_fused_lora_update_equals_peft_forward_and_gradients(tiny_model_dir, tokenizer):
    """The fused ``addmm`` LoRA forward against peft's own ``lora.Linear.forward`` (the class's, which
    the fused one replaces on the instances): outputs, log-probs and every LoRA gradient."""
    from peft.tuners.lora import Linear as LoraLinear

    spec = DPOConfig(output="unused", data=("unused",), model=str(tiny_model_dir)).policy_spec()
    policy = build_policy(spec)
    _perturb_adapter(policy)
    layers = [m for m in policy.model.modules() if isinstance(m, LoraLinear)]
    assert layers and all("forward" in vars(m) for m in layers), "build_policy did not fuse the LoRA layers"
    enc = Encoder(tokenizer, 128, 96)
    batch = collate([enc.encode(({"role": "user", "content": "Name a colour"},), "Blue, like the sea."),
                     enc.encode(({"role": "user", "content": "Hi"},), "Hello")], tokenizer.pad_token_id)
    results = []
    for fused in (True, False):
        if not fused:
            for m in layers:
                del m.forward  # back to peft's class method
        policy.model.zero_grad()
        out = sequence_logprobs(policy.model, batch, impl="naive")
        out.logps.sum().backward()
        results.append((out.logps.detach(), {n: p.grad.clone() for n, p in policy.named_trainable()}))
    (l_fused, g_fused), (l_peft, g_peft) = results
    torch.testing.assert_close(l_fused, l_peft, rtol=1e-6, atol=1e-5)
    for name in g_peft:
        torch.testing.assert_close(g_fused[name], g_peft[name], rtol=1e-5, atol=1e-7)


def test_init_adapter_starts_from_a_saved_adapter_and_refuses_what_does_not_fit(tmp_path, tiny_model_dir, pairs_file):
    from peft import PeftModel
    from steer.training.dpo_cli import main
    from steer.training.settings import MixtureConfig
    from transformers import AutoModelForCausalLM

    from steer.errors import InvalidInput

    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--batch-size", "2", "--lr", "5e-2", "--no-progress",
              "--lora-target", "q_proj,v_proj", "--lora-r", "4", "--lora-alpha", "8"]
    assert main(["--data", str(pairs_file), "--output", str(out), *common]) == 0
    adapter = out / "adapter"
    config = DPOConfig(output=str(tmp_path / "next"), data=(str(pairs_file),), model=str(tiny_model_dir),
                       lora_target="q_proj,v_proj", lora_r=4, lora_alpha=8, init_adapter=str(adapter))
    policy = build_policy(config.policy_spec())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    policy.model.eval()
    with torch.no_grad():
        got, want = policy.model(input_ids=ids).logits, expected(input_ids=ids).logits
        plain = base(input_ids=ids).logits
        with policy.reference():
            ref = policy.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # starts where the saved adapter ended
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-5)  # the reference stays the base model
    assert all(p.requires_grad for _, p in policy.named_trainable()) and len(policy.named_trainable()) == 8

    def refused(field, **changes):
        kwargs = dict(output=str(tmp_path / "x"), data=(str(pairs_file),), model=str(tiny_model_dir),
                      lora_target="q_proj,v_proj", lora_r=4, lora_alpha=8, init_adapter=str(adapter)) | changes
        with pytest.raises(InvalidInput) as e:
            build_policy(DPOConfig(**kwargs).policy_spec())
        assert e.value.field == field, e.value
        return str(e.value)

    assert "has r=4" in refused("lora_r", lora_r=8)
    assert "has lora_alpha=8" in refused("lora_alpha", lora_alpha=16)
    # The tiny model has 2 layers: v_proj's A and B weights are left over, or k_proj's have no source.
    assert "0 adapted weights missing from it (e.g. []), 4 of its weights not adapted here" in refused(
        "lora_target", lora_target="q_proj")
    assert "4 adapted weights missing from it" in refused("lora_target", lora_target="q_proj,k_proj,v_proj")
    assert "adapter_config.json" in refused("init_adapter", init_adapter=str(tmp_path))
    assert "--full" in refused("init_adapter", full=True)
    assert "model" in refused("init_adapter", init_adapter="default")  # the shipped adapter fits the default model only
    with pytest.raises(InvalidInput, match="init_adapter"):
        MixtureConfig(output=str(tmp_path / "m"), model=str(tiny_model_dir), init_adapter=str(adapter))
