"""Multi-objective reward model: a causal LM backbone (+ LoRA) with a k-output linear head.

The model reads the conversation and the response through the chat template (one assistant turn
appended) and maps the last-layer hidden state of the last non-pad token to k rewards, one per
objective. ``python -m steer.train reward`` trains it (``steer.training.reward_model``); this
module owns the model, the text it reads, and the directory format both sides use, so that the
server can load a trained model without importing the training package.

Directory format (``FORMAT`` / ``VERSION``)::

    <dir>/reward_model.json    written last: its presence marks a complete model
        {"format": "steer-reward-model", "version": 1,
         "objectives": ["helpfulness", ...],      head output order
         "base_model": "default" | "<model dir>" | "<file.gguf>",
         "adapter": "adapter" | null,             PEFT LoRA subdirectory, null for a frozen backbone
         "hidden_size": 576, "max_length": 512,   tokens read (the conversation is cut from the left)
         "label_mean": [..], "label_std": [..],   head output h -> raw reward h * std + mean (label scale)
         "calibration": {"helpfulness": {"mean": .., "std": ..}, ...} | null,   raw -> common scale
         "metrics": {...}, "training": {...}}     informational
    <dir>/head.safetensors     "weight" (k, hidden), "bias" (k,), float32
    <dir>/adapter/             PEFT adapter (adapter_config.json + adapter_model.safetensors)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from steer.chat_tokens import ChatTokenizer
from steer.files import atomic_directory_write, atomic_file, atomic_write_text
from steer.objectives import validate_objectives
from steer.rewards.calibration import Calibration
from steer.rewards.scorer import Conversation, Scorer

FORMAT = "steer-reward-model"
VERSION = 1
CONFIG_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class RewardModelSpec:
    """What ``reward_model.json`` describes (see the module docstring)."""

    objectives: tuple[str, ...]
    base_model: str
    hidden_size: int
    max_length: int = 512
    adapter: str | None = ADAPTER_DIR
    label_mean: tuple[float, ...] | None = None  # None: zeros (head outputs are the raw rewards)
    label_std: tuple[float, ...] | None = None  # None: ones
    calibration: Mapping[str, tuple[float, float]] | None = None
    metrics: Mapping = field(default_factory=dict)
    training: Mapping = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "objectives", validate_objectives(self.objectives, "reward_model.objectives"))
        k = len(self.objectives)
        for name in ("label_mean", "label_std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != k:
                    raise ValueError(f"reward_model.{name} has {len(value)} values for {k} objectives")
                object.__setattr__(self, name, value)
        if self.label_std is not None and any(not s > 0 for s in self.label_std):
            raise ValueError(f"reward_model.label_std must be > 0, got {self.label_std}")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ValueError(f"reward_model.max_length must be an integer >= 8, got {self.max_length!r}")

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["objectives"] = list(self.objectives)
        if self.calibration is not None:
            doc["calibration"] = {o: {"mean": m, "std": s} for o, (m, s) in self.calibration.items()}
        return {"format": FORMAT, "version": VERSION, **doc}

    @classmethod
    def from_json(cls, doc: Mapping, where: str) -> RewardModelSpec:
        if doc.get("format") != FORMAT:
            raise ValueError(f"{where}: not a {FORMAT} config (format={doc.get('format')!r})")
        if doc.get("version") != VERSION:
            raise ValueError(f"{where}: reward model format version {doc.get('version')!r}; "
                             f"this steer reads version {VERSION}")
        fields = {k: v for k, v in doc.items() if k not in ("format", "version")}
        try:
            if fields.get("calibration") is not None:
                fields["calibration"] = {o: (float(v["mean"]), float(v["std"]))
                                         for o, v in fields["calibration"].items()}
            return cls(**fields)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e


def render_for_reward(tokenizer, conversation: Conversation, response: str) -> str:
    """The text a reward model reads: the conversation with the response as the assistant's turn."""
    messages = [dict(m) for m in conversation] + [{"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def reward_ids(chat, conversation: Conversation, response: str) -> list[int]:
    """The ids of :func:`render_for_reward`'s text, read by ``chat`` (a :class:`steer.chat_tokens.ChatTokenizer`):
    control-token strings typed into the conversation or the response stay text, so a response
    cannot close its turn and append turns of its own. For ordinary text: the same ids."""
    messages = [dict(m) for m in conversation] + [{"role": "assistant", "content": response}]
    return chat.encode(messages, add_generation_prompt=False)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, T)`` ids and attention mask; a text longer than ``max_length`` keeps its
    last ``max_length`` tokens (the response and the end of the conversation matter most)."""
    return pad_ids([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], max_length, pad_id)


def pad_ids(rows: Sequence[Sequence[int]], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_texts` for rows already tokenised: each keeps its last ``max_length`` ids."""
    rows = [list(r)[-max_length:] for r in rows]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class RewardModel(nn.Module):
    """``(input_ids, attention_mask)`` right-padded -> ``(B, k)`` head outputs."""

    def __init__(self, backbone, num_objectives: int, hidden_size: int):
        super().__init__()
        self.backbone = backbone  # causal LM (possibly a PeftModel); only its decoder is run
        self.head = nn.Linear(hidden_size, num_objectives)

    @property
    def decoder(self):
        from steer.models import decoder_and_head

        return decoder_and_head(self.backbone)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        last = attention_mask.long().sum(1) - 1  # (B,) index of the last real token (right padding)
        pooled = hidden[torch.arange(hidden.shape[0]), last]  # (B, H)
        return self.head(pooled.float())  # (B, k)


def pad_id_of(tokenizer) -> int:
    from steer.models import pad_token_id

    return pad_token_id(tokenizer)


# -- saving and loading --------------------------------------------------------------------------


def save_reward_model(path: str | os.PathLike, model: RewardModel, spec: RewardModelSpec) -> Path:
    """Write the directory format: adapter, head, then ``reward_model.json`` last."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if spec.adapter is not None:
        if not hasattr(model.backbone, "save_pretrained") or not hasattr(model.backbone, "peft_config"):
            raise ValueError("spec names an adapter but the backbone is not a PEFT model")
        atomic_directory_write(path / spec.adapter, lambda d: model.backbone.save_pretrained(str(d)))
    head = {"weight": model.head.weight.detach().float().contiguous(),
            "bias": model.head.bias.detach().float().contiguous()}
    with atomic_file(path / HEAD_FILE) as tmp:
        save_file(head, str(tmp), metadata={"format": "pt"})
    atomic_write_text(path / CONFIG_FILE, json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read_reward_model_spec(path: str | os.PathLike) -> RewardModelSpec:
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not a reward model directory: {CONFIG_FILE} is missing")
    try:
        doc = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}:{e.lineno}: {e.msg}") from e
    return RewardModelSpec.from_json(doc, str(config))


def is_reward_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_reward_model(path: str | os.PathLike, dtype: str = "float32") -> tuple[RewardModel, object, RewardModelSpec]:
    """``(model in eval mode, tokenizer, spec)``; a LoRA adapter is merged into the base weights."""
    from safetensors.torch import load_file

    from steer.models import load_model

    path = Path(path)
    spec = read_reward_model_spec(path)
    adapter = str(path / spec.adapter) if spec.adapter is not None else None
    loaded = load_model(spec.base_model, adapter=adapter, dtype=dtype, merge_adapter=True)
    model = RewardModel(loaded.model, len(spec.objectives), spec.hidden_size)
    head = load_file(str(path / HEAD_FILE))
    expected = (len(spec.objectives), spec.hidden_size)
    if tuple(head["weight"].shape) != expected:
        raise ValueError(
            f"{path / HEAD_FILE}: head weight is {tuple(head['weight'].shape)}, the config says {expected}")
    model.head.load_state_dict(head)
    return model.eval(), loaded.tokenizer, spec


class RewardModelScorer(Scorer):
    """Rewards from a trained reward model directory."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 16, dtype: str = "float32"):
        self.path = Path(path)
        self.model, self.tokenizer, self.spec = load_reward_model(self.path, dtype)
        self.chat = ChatTokenizer(self.tokenizer)
        self.objectives = self.spec.objectives
        self.batch_size = batch_size
        k = len(self.objectives)
        self._label_mean = torch.tensor(self.spec.label_mean or (0.0,) * k)  # (k,)
        self._label_std = torch.tensor(self.spec.label_std or (1.0,) * k)  # (k,)
        self.calibration = (Calibration(dict(self.spec.calibration), str(self.path / CONFIG_FILE))
                            if self.spec.calibration else None)

    def raw_scores(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        rows = [reward_ids(self.chat, c, r) for c, r in zip(conversations, responses)]
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                ids, mask = pad_ids(rows[start: start + self.batch_size], self.spec.max_length,
                                    pad_id_of(self.tokenizer))
                outputs.append(self.model(ids, mask))  # (b, k)
        return torch.cat(outputs) * self._label_std + self._label_mean  # (n, k) on the label scale

    def describe(self) -> str:
        note = "" if self.calibration is not None else "; uncalibrated"
        return f"rm({','.join(self.objectives)}; {self.path}{note})"
