"""FLR: Follow-up Likelihood as Reward (Zhang et al., 2024), a training-free reward vector.

For a conversation ``c`` and a response ``y``, and for each objective with positive follow-ups
``F+`` and negative follow-ups ``F-`` (:mod:`steer.rewards.followups`)::

    reward(c, y) = mean_{f in F+} ll(f | c, y) - mean_{f in F-} ll(f | c, y)
    ll(f | c, y) = (1 / |f|) * sum_t log p(f_t | c, y, f_<t)

where ``f`` is appended as the next user turn through the model's chat template and only the
follow-up's own tokens are scored (not the template's role markers or end-of-turn token).
A sequence is tokenised as ``tokens(prefix) + tokens(follow-up)``, where ``prefix`` is the rendered
conversation, response and next-turn header up to the follow-up's first character, tokenised by
:class:`steer.chat_tokens.ChatTokenizer`: only the template's own turn markers are control tokens,
so a response (or prompt) that types ``<|im_end|><|im_start|>user ...`` reads as that text and cannot
fake a turn of its own (for ordinary text the ids are those of render-then-tokenise). A prefix that
would not leave room for the longest follow-up in the scorer model's context keeps only its last
tokens (the response and the end of the conversation matter most; the reward model does the same),
so any generated text can be scored.

Log-likelihoods are real model log-probabilities: hidden states of the model's last layer (after
its final norm) go through the fused linear log-prob op (:func:`steer.kernels.linear_logprob`)
with the LM-head weight, so the ``N x V`` logits of a batch are never held at once.

Two paths behind one switch (``FLRConfig.prefix_cache``), compared directly in the tests:

* prefix cache (default): the shared prefixes ``c + y + header`` of ``prefix_batch`` responses run
  as one right-padded forward; their batched KV cache is then gathered per row, one row per
  (response, follow-up), and the follow-ups of all those responses run as short right-padded
  continuations, at most ``batch_size`` rows per forward. Each row attends to its own response's
  prefix (padding masked out) with RoPE positions continuing from that prefix's true length.
  Cost per response ~ ``|prefix| + sum |f|`` tokens instead of ``|F| * |prefix|``, in a few large
  forwards instead of one small one per response.
* padded batches (the reference): every ``prefix + follow-up`` sequence runs whole, right-padded
  with an attention mask, ``batch_size`` sequences per forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from steer.chat_tokens import ChatTokenizer
from steer.errors import InvalidInput
from steer.models import decoder_and_head, pad_token_id
from steer.objectives import validate_objectives
from steer.rewards.calibration import (
    Calibration,
    cache_dir,
    config_key,
    find_calibration,
    model_fingerprint,
    read_calibration_file,
)
from steer.rewards.calibration_set import CALIBRATION_SET_ID, calibration_conversations
from steer.rewards.followups import BUILTIN_FOLLOWUPS, FollowUps
from steer.rewards.scorer import Conversation, Scorer

log = logging.getLogger(__name__)

FLR_VERSION = "flr-v1"  # bump when the scoring definition changes: it invalidates stored calibrations


@dataclass(frozen=True)
class FLRConfig:
    objectives: tuple[str, ...] = ("helpfulness", "creativity")  # objectives FLR scores, in output order
    # objective -> follow-ups; None: built-in sets
    followups: Mapping[str, FollowUps] | None = field(default=None, compare=False)
    # follow-up rows per forward; with the prefix cache each row holds a copy of its prefix's KV
    # (~14 MB at 300 tokens, default model)
    batch_size: int = 32
    # responses whose prefixes run in one forward (prefix cache only); their follow-ups then share forwards
    prefix_batch: int = 8
    prefix_cache: bool = True  # run conversation + response once, reuse its KV cache for every follow-up
    progress: bool = False  # tqdm bar over the responses scored, advanced per prefix batch
    # "auto": shipped/cached stats or compute them on the built-in set; "none": raw; or a JSON path
    calibration: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "objectives", validate_objectives(self.objectives, "flr.objectives"))
        followups = BUILTIN_FOLLOWUPS if self.followups is None else self.followups
        missing = [o for o in self.objectives if o not in followups]
        if missing:
            raise InvalidInput("flr.objectives", f"no follow-ups for {missing}; "
                                                 f"built-in sets exist for {sorted(BUILTIN_FOLLOWUPS)}")
        for o in self.objectives:
            if not isinstance(followups[o], FollowUps):
                raise InvalidInput(f"flr.followups[{o}]", f"must be a FollowUps, got {type(followups[o]).__name__}")
        for name in ("batch_size", "prefix_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"flr.{name}", f"must be an integer >= 1, got {value!r}")
        if not isinstance(self.calibration, str) or not self.calibration:
            raise InvalidInput("flr.calibration", "is 'auto', 'none' or a calibration JSON path")

    def followups_for(self, objective: str) -> FollowUps:
        return (BUILTIN_FOLLOWUPS if self.followups is None else self.followups)[objective]


def followups_digest(sets: FollowUps) -> str:
    return hashlib.sha256(json.dumps([list(sets.positive), list(sets.negative)]).encode()).hexdigest()[:16]


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L)`` ids right-padded with ``pad_id`` and ``(B,)`` lengths."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths


class FLRScorer(Scorer):
    """FLR rewards from a causal chat LM; see the module docstring for the definition."""

    def __init__(self, model, tokenizer, config: FLRConfig = FLRConfig(), *, model_id: str = "",
                 context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_id = model_id
        self.objectives = config.objectives
        self.decoder, self.lm_head = decoder_and_head(model)
        self.context_length = context_length or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.device = self.lm_head.weight.device
        self.pad_id = pad_token_id(tokenizer)  # padded positions are masked out and never scored
        self.chat = ChatTokenizer(tokenizer)
        # The follow-up list every pair is scored against, deduplicated, and each objective's columns in it.
        self.followups: list[str] = []
        self._columns: dict[str, tuple[list[int], list[int]]] = {}
        for o in self.objectives:
            sets = config.followups_for(o)
            self._columns[o] = ([self._column(f) for f in sets.positive], [self._column(f) for f in sets.negative])
        self._followup_ids = {f: tokenizer(f, add_special_tokens=False)["input_ids"] for f in self.followups}
        self.calibration = self._load_calibration(config.calibration)

    def _column(self, followup: str) -> int:
        if followup not in self.followups:
            self.followups.append(followup)
        return self.followups.index(followup)

    def describe(self) -> str:
        note = "" if self.calibration is not None else "; uncalibrated"
        model = f"; model={self.model_id}" if self.model_id else ""
        return f"flr({','.join(self.objectives)}{model}{note})"

    # -- rewards ------------------------------------------------------------------------------

    def raw_scores(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        ll = self.followup_loglik(conversations, responses)  # (n, F)
        columns = []
        for o in self.objectives:
            pos, neg = self._columns[o]
            columns.append(ll[:, pos].mean(1) - ll[:, neg].mean(1))  # (n,)
        return torch.stack(columns, dim=1)  # (n, k)

    def followup_loglik(self, conversations: Sequence[Conversation], responses: Sequence[str],
                        followups: Sequence[str] | None = None) -> torch.Tensor:
        """``(n, F)``: mean token log-likelihood of each follow-up after each (conversation, response)."""
        followups = list(self.followups if followups is None else followups)
        for f in followups:
            if f not in self._followup_ids:
                self._followup_ids[f] = self.tokenizer(f, add_special_tokens=False)["input_ids"]
        room = self.context_length - max((len(self._followup_ids[g]) for g in followups), default=0)
        if room < 1:
            raise InvalidInput("followups",
                               f"a follow-up does not fit the scorer model's context of {self.context_length} tokens")
        # items[(i, j)] = (prefix ids, follow-up ids); prefixes are shared across j for a given i.
        prefixes: dict[tuple[int, ...], list[int]] = {}
        groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, (conv, response) in enumerate(zip(conversations, responses)):
            fields = [f"conversations[{i}][{k}].content" for k in range(len(conv))] + [f"responses[{i}]", "followup"]
            for j, f in enumerate(followups):
                prefix = tuple(self._prefix_ids(conv, response, f, fields))
                if prefix not in prefixes:
                    prefixes[prefix] = list(prefix[-room:])  # (see module docstring: long prefixes keep their end)
                groups.setdefault(prefix, []).append((i, j))
        out = torch.empty(len(responses), len(followups))
        with torch.inference_mode():
            if self.config.prefix_cache:
                order = list(groups)
                values = self._loglik_shared_prefixes(
                    [prefixes[p] for p in order],
                    [[self._followup_ids[followups[j]] for _, j in groups[p]] for p in order],
                )
                for p, v in zip(order, values):
                    for (i, j), x in zip(groups[p], v.tolist()):
                        out[i, j] = x
            else:
                members = [m for ms in groups.values() for m in ms]
                items = [(prefixes[p], self._followup_ids[followups[j]]) for p, ms in groups.items() for _, j in ms]
                values = self._loglik_padded(items)
                for (i, j), v in zip(members, values.tolist()):
                    out[i, j] = v
        return out

    def _prefix_ids(self, conversation: Conversation, response: str, followup: str,
                    fields: Sequence[str] | None = None) -> list[int]:
        """Token ids before the follow-up's first token: the conversation, the response as the
        assistant's turn, and the next user-turn header. Message text is plain text (module docstring)."""
        messages = [dict(m) for m in conversation] + [
            {"role": "assistant", "content": response},
            {"role": "user", "content": followup},
        ]
        return self.chat.encode(messages, fields, add_generation_prompt=False, before_last_text=True)

    def _prefix_text(self, conversation: Conversation, response: str, followup: str) -> str:
        """The rendered text before the follow-up's first character (ends with the user-turn header):
        what :meth:`_prefix_ids` reads as text; for ordinary text its tokens are those ids."""
        messages = [dict(m) for m in conversation] + [
            {"role": "assistant", "content": response},
            {"role": "user", "content": followup},
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        at = text.rfind(followup)
        if at < 0:
            raise ValueError(f"the chat template does not render the follow-up {followup!r} verbatim; "
                             "FLR cannot locate its tokens")
        return text[:at]

    def continuation_loglik(self, prefix_ids: Sequence[Sequence[int]],
                            continuation_ids: Sequence[Sequence[Sequence[int]]], *,
                            desc: str = "log-likelihood") -> list[torch.Tensor]:
        """Per prefix ``u``, the summed log-likelihood of each of its continuations ``continuation_ids[u]``.

        The same batched, prefix-cached forward as the follow-up scores (each prefix runs once, its
        continuations attend to its cache), with sums instead of means: what
        :mod:`steer.rewards.principle_judge`'s instruction judge compares. Prefixes longer than the
        model's context keep their end, as follow-up prefixes do."""
        if len(prefix_ids) != len(continuation_ids):
            raise ValueError(f"{len(prefix_ids)} prefixes for {len(continuation_ids)} continuation lists")
        room = self.context_length - max((len(c) for cs in continuation_ids for c in cs), default=0)
        if room < 1:
            raise InvalidInput("responses", f"a response does not fit the model's context of {self.context_length} "
                                            "tokens")
        for u, cs in enumerate(continuation_ids):
            if any(not c for c in cs):
                raise ValueError(f"prefix {u}: an empty continuation has no log-likelihood")
        with torch.inference_mode():
            return self._loglik_shared_prefixes([list(p)[-room:] for p in prefix_ids],
                                                [[list(c) for c in cs] for cs in continuation_ids],
                                                reduction="sum", desc=desc, unit="prompt")

    def _mean_logprob(self, inputs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
        """Mean (``reduction="sum"``: summed) log p of each row's first ``lengths[b]`` targets.

        inputs ``(B, L, H)``: row t holds the hidden state that predicts target t; targets ``(B, L)``.
        Only the scored rows go through the fused op (``N = sum(lengths)`` of them, not ``B * L``):
        selecting them first keeps the vocabulary projection to the follow-up tokens alone.
        """
        from steer.kernels import linear_logprob

        B, L, _ = inputs.shape
        device = inputs.device
        targets, lengths = targets.to(device), lengths.to(device)
        valid = torch.arange(L, device=device)[None, :] < lengths[:, None]  # (B, L)
        rows = inputs[valid]  # (N, H)
        bias = getattr(self.lm_head, "bias", None)
        logp = linear_logprob(rows, self.lm_head.weight, targets[valid], bias=bias).float()  # (N,)
        seq = torch.arange(B, device=device)[:, None].expand(B, L)[valid]  # (N,) which sequence each row belongs to
        sums = torch.zeros(B, device=device).index_add_(0, seq, logp)  # (B,)
        return (sums if reduction == "sum" else sums / lengths.float()).cpu()

    def _loglik_shared_prefixes(self, prefix_ids: list[list[int]], followup_ids: list[list[list[int]]], *,
                                reduction: str = "mean", desc: str = "FLR",
                                unit: str = "response") -> list[torch.Tensor]:
        """Per prefix ``u``, the ``(len(followup_ids[u]),)`` mean (or summed) log-likelihoods of its follow-ups."""
        from tqdm.auto import tqdm
        from transformers import DynamicCache

        # Longest first: prefixes of similar length share a forward, so little of it is padding.
        order = sorted(range(len(prefix_ids)), key=lambda u: -len(prefix_ids[u]))
        batches = [order[s: s + self.config.prefix_batch] for s in range(0, len(order), self.config.prefix_batch)]
        results: list[torch.Tensor | None] = [None] * len(prefix_ids)
        with tqdm(total=len(prefix_ids), desc=desc, unit=unit, disable=not self.config.progress,
                  dynamic_ncols=True) as bar:
            for batch in batches:
                ids, plen = _pad_right([prefix_ids[u] for u in batch], self.pad_id)  # (B, P), (B,)
                B, P = ids.shape
                pmask = (torch.arange(P)[None, :] < plen[:, None]).long()  # (B, P)
                cache = DynamicCache(config=self.model.config)
                hidden = self.decoder(
                    input_ids=ids.to(self.device), attention_mask=pmask.to(self.device),
                    position_ids=torch.arange(P, device=self.device)[None, :].expand(B, P),
                    past_key_values=cache, use_cache=True,
                ).last_hidden_state  # (B, P, H)
                # (B, H): predicts each follow-up's first token
                last = hidden[torch.arange(B, device=self.device), (plen - 1).to(self.device)]
                # One row per (prefix, follow-up), shortest follow-ups together so rows carry little padding.
                rows = sorted(((b, k) for b, u in enumerate(batch) for k in range(len(followup_ids[u]))),
                              key=lambda r: len(followup_ids[batch[r[0]]][r[1]]))
                values = []
                for start in range(0, len(rows), self.config.batch_size):
                    chunk = rows[start: start + self.config.batch_size]
                    owner = torch.tensor([b for b, _ in chunk])  # (r,) the prefix row each follow-up row attends to
                    fids, flen = _pad_right([followup_ids[batch[b]][k] for b, k in chunk], self.pad_id)  # (r, L), (r,)
                    r, L = fids.shape
                    # right padding: cache slots past the chunk's longest prefix are padding for every row
                    Pc = int(plen[owner].max())
                    at = owner.to(self.device)
                    # Gathering copies: the forward appends to the cache, and the batched prefix cache stays reusable.
                    kv = DynamicCache(
                        # (B, heads, P, d) -> (r, heads, Pc, d) per layer
                        ddp_cache_data=[(keys[at, :, :Pc], vals[at, :, :Pc]) for keys, vals, *_ in cache],
                        config=self.model.config,
                    )
                    mask = torch.cat([pmask[owner, :Pc], (torch.arange(L)[None, :] < flen[:, None]).long()],
                                     dim=1)  # (r, Pc + L)
                    # (r, L): RoPE positions continue each row's own prefix
                    positions = plen[owner][:, None] + torch.arange(L)[None, :]
                    h = self.decoder(
                        input_ids=fids.to(self.device), attention_mask=mask.to(self.device),
                        position_ids=positions.to(self.device), past_key_values=kv, use_cache=True,
                    ).last_hidden_state  # (r, L, H)
                    # (r, L, H): row t predicts follow-up token t
                    inputs = torch.cat([last[at][:, None], h[:, :-1]], dim=1)
                    values.append(self._mean_logprob(inputs, fids, flen, reduction))
                values = torch.cat(values)  # (rows,) in `rows` order
                for b, u in enumerate(batch):
                    results[u] = torch.empty(len(followup_ids[u]))
                for (b, k), v in zip(rows, values.tolist()):
                    results[batch[b]][k] = v
                del cache, hidden
                bar.update(len(batch))
        return results

    def _loglik_padded(self, items: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        results = []
        for start in range(0, len(items), self.config.batch_size):
            chunk = items[start: start + self.config.batch_size]
            ids, seq_lengths = _pad_right([p + f for p, f in chunk], self.pad_id)  # (b, T), (b,)
            b, T = ids.shape
            mask = (torch.arange(T)[None, :] < seq_lengths[:, None]).long()  # (b, T)
            hidden = self.decoder(input_ids=ids.to(self.device),
                                  attention_mask=mask.to(self.device)).last_hidden_state  # (b, T, H)
            targets, lengths = _pad_right([f for _, f in chunk], self.pad_id)  # (b, L), (b,)
            # Follow-up token t of item r sits at position P_r + t and is predicted by row P_r + t - 1.
            starts = torch.tensor([len(p) - 1 for p, _ in chunk])  # (b,)
            rows = (starts[:, None] + torch.arange(targets.shape[1])[None, :]).clamp(max=T - 1)  # (b, L)
            inputs = hidden.gather(1, rows.to(self.device)[..., None].expand(-1, -1, hidden.shape[-1]))  # (b, L, H)
            results.append(self._mean_logprob(inputs, targets, lengths))
        return torch.cat(results)

    # -- calibration --------------------------------------------------------------------------

    def calibration_keys(self) -> dict[str, str]:
        """Per objective, a hash of everything its statistics depend on."""
        base = {
            "version": FLR_VERSION,
            "model": model_fingerprint(self.model),
            "template": hashlib.sha256(str(getattr(self.tokenizer, "chat_template", "")).encode()).hexdigest()[:16],
            "set": CALIBRATION_SET_ID,
        }
        keys = {}
        for o in self.objectives:
            sets = self.config.followups_for(o)
            keys[o] = config_key(**base, objective=o, followups=followups_digest(sets))
        return keys

    def calibrate(self) -> Calibration:
        """Statistics of raw rewards over the built-in calibration set (one batched scoring pass)."""
        conversations, responses = calibration_conversations()
        started = time.monotonic()
        raw = self.raw_scores(conversations, responses)
        log.info("FLR calibration over %d pairs took %.1fs", len(responses), time.monotonic() - started)
        return Calibration.fit(self.objectives, raw, CALIBRATION_SET_ID)

    def save_calibration(self, path, calibration: Calibration):
        """Write ``calibration`` with its keys; the set id and follow-up digests are stored in the
        clear too, so a test can tell a stale shipped file without loading the model."""
        return calibration.save(
            path, self.calibration_keys(), scorer="flr", model_id=self.model_id, flr_version=FLR_VERSION,
            calibration_set=CALIBRATION_SET_ID, n=len(calibration_conversations()[1]),
            followups={o: followups_digest(self.config.followups_for(o)) for o in self.objectives},
        )

    def _load_calibration(self, spec: str) -> Calibration | None:
        if spec == "none":
            return None
        keys = self.calibration_keys()
        if spec != "auto":
            calibration, stored = read_calibration_file(spec)
            stale = [o for o in self.objectives if stored.get(o) != keys[o]]
            if stale:
                raise InvalidInput(
                    "calibration",
                    f"{spec} was computed for another model, follow-up set or calibration set (objectives {stale}); "
                    "recompute it with `python -m steer.rewards.calibrate`",
                )
            return calibration
        found = find_calibration(keys)
        if found is not None and all(o in found.stats for o in self.objectives):
            return found
        log.info("no stored FLR calibration for this model; computing it on the built-in set (cached afterwards)")
        computed = self.calibrate()
        path = cache_dir() / f"flr-{keys[self.objectives[0]]}.json"
        try:
            self.save_calibration(path, computed)
        except OSError as e:  # a read-only cache only costs the next start another calibration
            log.warning("could not cache the FLR calibration at %s: %s", path, e)
        return computed
