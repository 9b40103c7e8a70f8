"""`megatron-red eval`: evaluate a model (HF directory, training run or checkpoint) on the RED paper's benchmarks.

Benchmarks default to the paper's suite; `--benchmarks` takes a subset.

Example:
    megatron-red eval --model runs/red --benchmarks math500,aime24 --limit 50 --out runs/eval1
Rerunning with the same --out resumes from the generation cache.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_red.eval.benchmarks import BENCHMARKS, SUITES
from megatron_red.eval.engines import ENGINE_KINDS
from megatron_red.eval.prompting import PROMPT_STYLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Hugging Face model directory, a training run directory (its final hf/, else its latest "
                             "checkpoint) or a checkpoint directory (its hf/, else exported into OUT/model)")
    parser.add_argument("--suite", default="red-paper", choices=sorted(SUITES),
                        help="named set of benchmarks (red-paper: AIME24/25 and AMC avg@32, MATH500, Minerva, "
                             "OlympiadBench pass@1; temperature 0.6, 8192 new tokens)")
    parser.add_argument("--benchmarks", default=None,
                        help=f"comma-separated subset of the suite; known: {','.join(BENCHMARKS)}")
    parser.add_argument("--data-dir", default=os.path.join("..", "shared", "data", "eval"),
                        help="directory with the benchmark jsonl files (or LUFFY's valid.all.parquet) and "
                             "luffy_system_prompt.txt")
    parser.add_argument("--out", required=True, help="output directory (cache, results.md, results.json)")
    parser.add_argument("--n", type=int, default=None, help="samples per problem, for every benchmark")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences (prompts x samples) per engine call")
    parser.add_argument("--prompt-style", default="chat-think", choices=PROMPT_STYLES,
                        help="chat-think: chat template + the <think> system prompt; chat: template only; "
                             "plain: problem text and a request for a boxed answer")
    parser.add_argument("--system-prompt-file", default=None,
                        help="system prompt for chat-think (default: DATA_DIR/luffy_system_prompt.txt)")
    parser.add_argument("--engine", default="local", choices=ENGINE_KINDS)
    parser.add_argument("--dump-problems", action="store_true", help="write problems.jsonl with every sample")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grade-timeout", type=float, default=5.0, help="seconds per graded answer")
    parser.add_argument("--grade-workers", type=int, default=None, help="grading processes (default min(4, cpus))")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _TokenizerAdapter:
    """A megatron_red tokenizer without a Hugging Face form (the built-in task's SentencePiece model) behind the
    part of the transformers tokenizer API that evaluation uses; it has no chat template (prompts are plain)."""

    chat_template = None

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.tokenizer.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer_for_eval(path: str):
    """The tokenizer saved with a model: a transformers tokenizer, or a megatron_red one written by `save`."""
    from megatron_red.data.tokenizer import META_FILE, HFTokenizer, load_tokenizer

    if os.path.exists(os.path.join(path, META_FILE)):
        tokenizer = load_tokenizer(path)
        return tokenizer.hf if isinstance(tokenizer, HFTokenizer) else _TokenizerAdapter(tokenizer)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_model_and_tokenizer(path: str, device: str):
    """A local HF causal LM (bf16 on GPU, fp32 on CPU) in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: not a directory")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = load_tokenizer_for_eval(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    return model, tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_red.eval.engines import build_engine
    from megatron_red.eval.report import to_markdown
    from megatron_red.eval.runner import EvalConfig, evaluate
    from megatron_red.rewards import configure_grader
    from megatron_red.trainer.export import resolve_hf_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    try:
        model_dir = str(resolve_hf_model(args.model, os.path.join(args.out, "model")))
    except (ValueError, FileNotFoundError) as e:
        print(f"megatron-red eval: error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    config = EvalConfig(
        model_id=os.path.realpath(model_dir), out_dir=args.out, suite=args.suite,
        benchmarks=args.benchmarks.split(",") if args.benchmarks else None, data_dir=args.data_dir, n=args.n,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, limit=args.limit,
        batch_size=args.batch_size, prompt_style=args.prompt_style, system_prompt_file=args.system_prompt_file,
        dump_problems=args.dump_problems, seed=args.seed, grade_timeout_s=args.grade_timeout,
        progress=not args.no_progress,
    )
    if args.grade_workers is not None:
        configure_grader(args.grade_workers)
    try:
        model, tokenizer = load_model_and_tokenizer(model_dir, device)
        engine = build_engine(args.engine, model, tokenizer, max_batch_size=args.batch_size)
        report = evaluate(engine, tokenizer, config)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as e:
        print(f"megatron-red eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished samples are cached in {args.out}: rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(to_markdown(report))
    print(f"generated {report.generated_samples} samples, reused {report.cache.used} from the cache")
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-red eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
