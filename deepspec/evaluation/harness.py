"""The eval harness: for each prompt set, plain decoding and speculative decoding of the same target
on the same prompts, timed side by side, plus the peers a user would reach for.

Per turn: the conversation so far (earlier turns answered by the target's plain decoding, so both
methods see identical prompts) is rendered with the chat template; plain decoding runs, then
speculative decoding with the drafter, each from the same seed. A warm-up turn runs first.
Reports: tau, prefix survival and conditional acceptance per position, the acceptance-length
histogram, tokens/s, wall-clock speedup with the time split into draft / verify / other, and for
DSpark the confidence calibration before/after Sequential Temperature Scaling.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from deepspec.config.data import InputConfig
from deepspec.config.eval import EvalDatasetConfig, EvalStageConfig
from deepspec.data.sources import NotUtf8, iter_raw_rows
from deepspec.config.decoding import LOOKUP_POLICIES
from deepspec.decoding.hybrid import make_engine_session, make_scheduler
from deepspec.decoding.scheduler import VerifyScheduler
from deepspec.decoding.sessions.lookup import LOOKUP, MODEL
from deepspec.decoding.speculative import autoregressive_generate, speculative_generate
from deepspec.decoding.verify import SamplingConfig
from deepspec.decoding.verify_cost import VerifyCostProfile
from deepspec.evaluation import metrics
from deepspec.evaluation.scheduler import simulate_serving
from deepspec.export import load_drafter
from deepspec.progress import Progress
from deepspec.target import TargetModel, load_tokenizer

log = logging.getLogger(__name__)


def load_prompts(ds: EvalDatasetConfig, seed: int) -> list[list[str]]:
    """The dataset's rows ({"turns": [str, ...]}) -> their turns, read by the data stage's row reader
    (JSONL split at newlines only, never at U+2028/U+2029 inside a string; or Parquet). A bad row is
    named by file and line."""
    rows, bad = [], []
    for raw in iter_raw_rows(InputConfig(paths=[ds.path])):
        if isinstance(raw.payload, NotUtf8):
            raise ValueError(f"{raw.file}:{raw.line}: {raw.payload.reason()}")
        try:
            row = json.loads(raw.payload) if isinstance(raw.payload, str) else raw.payload
        except json.JSONDecodeError as e:
            raise ValueError(f"{raw.file}:{raw.line}: not a JSON object ({e.msg} at column {e.colno})") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            bad.append(raw.line)
        rows.append(row)
    if bad:
        raise ValueError(f"{ds.path}: lines {bad[:10]} have no non-empty 'turns' list of strings")
    if ds.shuffle:
        random.Random(seed).shuffle(rows)
    return [r["turns"] for r in rows[: ds.max_prompts]]


@torch.no_grad()
def fit_sts(target, drafter, prompts: list[torch.Tensor], max_new_tokens: int, sampling: SamplingConfig, seed: int = 0) -> list[float]:
    """Sequential Temperature Scaling fitted on the rounds of a calibration split (every draft verified)."""
    conf, accepted = [], []
    for i, ids in enumerate(prompts):
        res = speculative_generate(target, drafter, ids, max_new_tokens, sampling, None, torch.Generator().manual_seed(seed + i))
        c, m = fully_verified_rounds(res)
        conf, accepted = conf + c, accepted + m
    return metrics.fit_sequential_temperatures(torch.tensor(conf), torch.tensor(accepted))


def fully_verified_rounds(res) -> tuple[list[list[float]], list[int]]:
    """(confidences, accepted drafts) of the rounds that verified every draft: the only rounds in which each slot's
    fate was observed (a slot past a scheduled prefix was never verified, and a plain round drafted nothing)."""
    if not res.confidences:
        return [], []
    g = len(res.confidences[0])
    # the same rounds, in the same order, in both records: the drafter's rounds whose L is its whole block (a lookup
    # round of the hybrid may verify g tokens too: it has no confidences)
    return ([c for c, L in zip(res.confidences, res.drafted_verified) if L == g],
            [m for m, L, s in zip(res.accepted_per_round, res.verified_per_round, res.source_per_round)
             if L == g and s == MODEL])


def token_sources(results) -> dict:
    """Tokens emitted by each source over generations: the lookup's and the drafter's accepted drafts, and the
    target's own tokens (plain steps, corrections, bonus tokens and the prefill's first token), as counts."""
    out = {"lookup": 0, "drafter": 0, "target": 0}
    for r in results:
        for m, e, s in zip(r.accepted_per_round, r.emitted_per_round, r.source_per_round):
            drafted = min(m, e) if s in (LOOKUP, MODEL) else 0  # drafts cut after EOS or max_new_tokens were not emitted
            out["lookup" if s == LOOKUP else "drafter"] += drafted
            out["target"] += e - drafted
        out["target"] += 1
    return out


def sts_fit_and_report(conf: torch.Tensor, accepted: torch.Tensor, fit: torch.Tensor) -> dict:
    """STS fitted on the rounds where fit (R,) is True, calibration before/after on the others.
    conf (R, g) raw per-position confidences; accepted (R,) drafts accepted per round."""
    temps = metrics.fit_sequential_temperatures(conf[fit], accepted[fit])
    held_conf, held_acc = conf[~fit], accepted[~fit]
    return {"sts_temperatures": temps, "fit_rounds": int(fit.sum()), "report_rounds": int((~fit).sum()),
            "before": metrics.calibration(held_conf, held_acc),
            "after": metrics.calibration(metrics.apply_temperatures(held_conf, temps), held_acc)}


class EvalHarness:
    def __init__(self, cfg: EvalStageConfig):
        self.cfg = cfg
        t = time.perf_counter()
        self.target = TargetModel.from_config(cfg.target)
        log.info("target loaded in %.1f s", time.perf_counter() - t)
        self.tok = load_tokenizer(cfg.target)
        self.drafter = load_drafter(cfg.drafter_path, target=cfg.target, device=self.target.device,
                                    dtype=next(self.target.model.parameters()).dtype)
        self.sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p)

    def _ids(self, messages: list[dict]) -> torch.Tensor:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0].to(self.target.device)

    def _turns(self, prompts: list[list[str]]):
        """Yield (prompt_index, input ids) per turn; later turns carry the plain decoding's answers."""
        greedy = SamplingConfig(temperature=0)
        for i, turns in enumerate(prompts):
            messages: list[dict] = []
            for turn in turns:
                messages.append({"role": "user", "content": turn})
                ids = self._ids(messages)
                yield i, ids
                if len(turns) > 1:
                    answer = autoregressive_generate(self.target, ids, self.cfg.max_new_tokens, greedy, self.tok.eos_token_id)
                    messages.append({"role": "assistant", "content": self.tok.decode(answer.tokens, skip_special_tokens=True)})

    def run_dataset(self, ds: EvalDatasetConfig, sampling: SamplingConfig) -> dict:
        cfg, eos = self.cfg, self.tok.eos_token_id
        turns = list(self._turns(load_prompts(ds, cfg.seed)))
        g = torch.Generator().manual_seed(cfg.seed)
        speculative_generate(self.target, self.proposer(), turns[0][1], 8, sampling, eos, g, self.scheduler())  # warm-up
        autoregressive_generate(self.target, turns[0][1], 8, sampling, eos, g)
        bar = Progress(len(turns), "turn", f"eval {ds.name} ({'greedy' if sampling.greedy else f'T={sampling.temperature:g}'}, "
                       "plain then speculative per turn)", every_s=15.0)
        plain_s = spec_s = 0.0
        plain_tokens = spec_tokens = 0
        sources: dict[str, int] = {}
        split = {"draft": 0.0, "verify": 0.0, "other": 0.0}
        accepted, verified, conf_rows, conf_accepted, conf_prompt, mismatches, emitted = [], [], [], [], [], [], []
        for i, ids in turns:
            t = time.perf_counter()
            plain = autoregressive_generate(self.target, ids, cfg.max_new_tokens, sampling, eos, torch.Generator().manual_seed(cfg.seed + i))
            plain_s += time.perf_counter() - t
            t = time.perf_counter()
            spec = speculative_generate(self.target, self.proposer(), ids, cfg.max_new_tokens, sampling, eos,
                                        torch.Generator().manual_seed(cfg.seed + i), self.scheduler())
            spec_s += time.perf_counter() - t
            plain_tokens, spec_tokens = plain_tokens + len(plain.tokens), spec_tokens + len(spec.tokens)
            if sampling.greedy and spec.tokens != plain.tokens:  # lossless check on every evaluated prompt
                mismatches.append(i)
            for k in split:
                split[k] += spec.seconds[k]
            drafted = [s == MODEL for s in spec.source_per_round]  # the drafter's rounds (L > 0); lookup rounds aside
            accepted += [m for m, d in zip(spec.accepted_per_round, drafted) if d]
            verified += [L for L, d in zip(spec.verified_per_round, drafted) if d]
            sources = {k: sources.get(k, 0) + v for k, v in token_sources([spec]).items()}
            c, m = fully_verified_rounds(spec)
            conf_rows, conf_accepted, conf_prompt = conf_rows + c, conf_accepted + m, conf_prompt + [i] * len(c)
            emitted += spec.emitted_per_round
            bar.update(1, tokens=len(plain.tokens) + len(spec.tokens))
        bar.close()
        g_len = self.block_size
        out = {"turns": len(turns), **metrics.acceptance_stats(accepted, g_len),
               "tau": sum(emitted) / max(len(emitted), 1),  # tokens emitted per round (nothing after EOS counted)
               "draft_tokens_proposed": len(accepted) * g_len,
               # accepted drafts per drafted token, and per *verified* drafted token (they differ when a schedule
               # verifies prefixes); named for what they count (DeepSpec's "verify rate" has no public definition)
               "draft_acceptance_rate": sum(accepted) / max(len(accepted) * g_len, 1),
               "verified_acceptance_rate": sum(accepted) / max(sum(verified), 1),
               "plain": {"tokens": plain_tokens, "seconds": plain_s, "tokens_per_s": plain_tokens / max(plain_s, 1e-9)},
               "speculative": {"tokens": spec_tokens, "seconds": spec_s, "tokens_per_s": spec_tokens / max(spec_s, 1e-9),
                               "time_split": split},
               "speedup": (spec_tokens / max(spec_s, 1e-9)) / (plain_tokens / max(plain_s, 1e-9)),
               # which proposer emitted what share of the tokens (lookup, drafter; the target's own tokens)
               "token_sources": {k: v / max(sum(sources.values()), 1) for k, v in sources.items()}}
        if sampling.greedy:
            out["greedy_identical_to_plain"] = not mismatches
            out["greedy_mismatched_prompts"] = mismatches
            if mismatches:
                log.error("%s: greedy speculative output differs from plain greedy on prompts %s", ds.name, mismatches)
        if conf_rows:
            out["calibration"] = self._calibration(torch.tensor(conf_rows), torch.tensor(conf_accepted), conf_prompt)
        return out

    def _calibration(self, conf: torch.Tensor, accepted: torch.Tensor, prompt_of_round: list[int]) -> dict:
        """Fit STS on the rounds of the first prompts, report before/after on the rest."""
        prompts = sorted(set(prompt_of_round))
        fit_prompts = set(prompts[: int(len(prompts) * self.cfg.calibration_fraction)])
        fit = torch.tensor([p in fit_prompts for p in prompt_of_round])
        if fit.all() or not fit.any():
            fit = torch.arange(len(prompt_of_round)) % 2 == 0
        out = sts_fit_and_report(conf, accepted, fit)
        scaled, held_acc = metrics.apply_temperatures(conf[~fit], out["sts_temperatures"]), accepted[~fit]
        return {**out, "threshold_sweep": metrics.threshold_sweep(scaled, held_acc),  # on cumulative survival
                "threshold_sweep_per_step": metrics.threshold_sweep(scaled, held_acc, per_step=True),
                "_rounds": list(zip(conf.tolist(), accepted.tolist())), "_fit": fit.tolist()}  # for the replay and the pooled fit

    def run(self) -> dict:
        cfg = self.cfg
        d = self.drafter
        results = {"config": asdict(cfg), "device": str(self.target.device), "datasets": {},
                   "drafter": {"kind": type(d).__name__.removesuffix("Drafter"), **d.cfg.to_dict(), "block": self.block_size,
                               "trainable_parameters": sum(p.numel() for p in d.parameters() if p.requires_grad)}}
        recorded = {}  # set name -> (conf, accepted, fit mask) of its drafted T=1 rounds, for the pooled STS fit
        for ds in cfg.datasets:
            entry = {"sampled": self.run_dataset(ds, self.sampling)}
            if cfg.also_greedy and not self.sampling.greedy:
                entry["greedy"] = self.run_dataset(ds, SamplingConfig(temperature=0))
            if cfg.peers:
                entry["peers"] = self.time_peers(ds)
            cal = entry["sampled"].get("calibration")
            if cal:  # replay the recorded rounds, STS-calibrated, in the serving simulation (Algorithm 1 vs fixed length)
                conf, acc = zip(*cal.pop("_rounds"))
                recorded[ds.name] = (torch.tensor(conf), torch.tensor(acc), torch.tensor(cal.pop("_fit")))
                rounds = [(metrics.apply_temperatures(torch.tensor([c]), cal["sts_temperatures"])[0].tolist(), m)
                          for c, m in zip(conf, acc)]
                entry["serving_simulation"] = simulate_serving(rounds, self.sps_table(), cfg.serving_loads,
                                                               g=len(rounds[0][0]), seed=cfg.seed)
            if "greedy" in entry and entry["greedy"].get("calibration"):
                entry["greedy"]["calibration"].pop("_rounds", None)
                entry["greedy"]["calibration"].pop("_fit", None)
            results["datasets"][ds.name] = entry
            log.info("%s: tau %.2f, speedup %.2fx (T=%s)", ds.name, entry["sampled"]["tau"], entry["sampled"]["speedup"], cfg.temperature)
        if hasattr(self, "_cost"):
            results["verify_cost"] = vc = self._cost.summary()
            log.info("verify cost: %d points measured by this run, %d read from %s", vc["points_measured"], vc["points_read"], vc["profile"])
        if recorded:
            # one STS fit on every set's calibration prompts together: a per-set fit sees tens to a few hundred
            # rounds (most rejected at position 1), too few to place late positions' temperatures; the paper
            # fits one calibration set
            conf, accepted, fit = (torch.cat(parts) for parts in zip(*recorded.values()))
            results["calibration_pooled"] = pooled = {"sets": list(recorded), **sts_fit_and_report(conf, accepted, fit)}
            from deepspec.export import STS_FILE  # the pooled fit is saved next to the drafter, applied at load

            (Path(cfg.drafter_path) / STS_FILE).write_text(json.dumps(
                {"temperatures": pooled["sts_temperatures"], "fitted_on": pooled["sets"], "temperature": cfg.temperature}, indent=1))
        return results

    def scheduler(self) -> VerifyScheduler | None:
        """The configured verification policy (None = verify every draft), with this machine's cost profile.
        One scheduler serves every generation of the run, so the draft cost it measures carries over."""
        sched = self.cfg.schedule
        if sched.policy == "fixed" and not sched.fixed_length:
            return None
        if not hasattr(self, "_scheduler"):
            cost = None
            if sched.policy in ("scheduled", "scheduled_with_draft_cost", *LOOKUP_POLICIES):
                # the eval decodes one prompt at a time: one row, verifying 1..G + 1 tokens (G: the block, or the
                # lookup's proposal length where a lookup policy's is longer); measured here, before the first timed
                # generation (a point missing later is measured when first asked)
                cost = self.cost_model()
                g = max(sched.lookup_tokens, self.block_size) if sched.policy in LOOKUP_POLICIES else self.block_size
                cost.ensure(rows=[1], widths=range(1, g + 2))
            self._scheduler = make_scheduler(sched, self.block_size, cost, getattr(self.drafter, "confidence_temperatures", None))
        return self._scheduler

    def proposer(self):
        """What the speculative runs decode with: the drafter (a session is made per generation), or under a lookup
        policy a fresh session of the lookup and the drafter (``decoding.hybrid``)."""
        if self.cfg.schedule.policy not in LOOKUP_POLICIES:
            return self.drafter
        return make_engine_session(self.scheduler(), self.drafter, 1, self.target.config.vocab_size)

    @property
    def block_size(self) -> int:
        return getattr(self.drafter.cfg, "block_size", getattr(self.drafter.cfg, "ttt_steps", 1))

    def cost_model(self) -> VerifyCostProfile:
        """Verify cost of this target on this machine, measured point by point as the run first needs it and kept
        across runs (``deepspec.decoding.verify_cost``): the scheduler's cost and the replay's SPS(B) alike."""
        if not hasattr(self, "_cost"):
            self._cost = VerifyCostProfile.open(self.target)
        return self._cost

    def sps_table(self) -> list[float]:
        """SPS(B) for B = 1..sps_max_tokens: steps per second of one row verifying B tokens (a packed batch), on the
        coarse grid of the profile (widths at powers of two, interpolated): 1 + log2(sps_max_tokens) points."""
        cost = self.cost_model()
        return [1.0 / cost.coarse(1, B) for B in range(1, self.cfg.sps_max_tokens + 1)]

    @torch.no_grad()
    def time_peers(self, ds: EvalDatasetConfig) -> dict:
        """transformers' own greedy generate and prompt-lookup decoding on the same first turns."""
        prompts = [self._ids([{"role": "user", "content": t[0]}]) for t in load_prompts(ds, self.cfg.seed)]
        out = {}
        for name, extra in (("hf_generate", {}), ("hf_prompt_lookup", {"prompt_lookup_num_tokens": 10})):
            self.target.model.generate(prompts[0][None], max_new_tokens=4, do_sample=False, pad_token_id=self.tok.pad_token_id, **extra)
            tokens, t = 0, time.perf_counter()
            for ids in prompts:
                gen = self.target.model.generate(ids[None], max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                                 pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id, **extra)
                tokens += gen.shape[1] - ids.shape[0]
            sec = time.perf_counter() - t
            out[name] = {"tokens": tokens, "seconds": sec, "tokens_per_s": tokens / max(sec, 1e-9)}
        return out
