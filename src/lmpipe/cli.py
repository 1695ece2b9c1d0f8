"""The `lmpipe` command line. Kept light: heavy libraries are imported only by the subcommand that needs them."""

from __future__ import annotations

import argparse
import os
import sys

from lmpipe.errors import LmpipeError
from lmpipe.formats import CLASSIFIER_INT8_DIR

DEFAULT_MODEL = "models/onnx/teacher-int8"
"""The model `generate` and `serve` load when --model is not given (lmpipe.serve.ServeConfig's default, which a
test keeps equal: importing it here would load pydantic for every subcommand)."""
API_KEY_ENV = "LMPIPE_API_KEY"
"""The environment variable `serve` takes its API key from when --api-key is not given (a key on the command
line shows in `ps`)."""
DEFAULT_CLASSIFIER = f"models/onnx/{CLASSIFIER_INT8_DIR}"
"""The encoder classifier `classify` loads when --classifier is not given (the quantize stage's int8 copy)."""


def cmd_params(args: argparse.Namespace) -> None:
    """Compose conf/ (plus overrides) and write it to params.yaml, exactly as `dvc exp run -S` would."""
    from lmpipe import atomic, config

    text = config.params_yaml(args.overrides)
    if args.check:
        current = config.PARAMS_FILE.read_text(encoding="utf-8") if config.PARAMS_FILE.exists() else ""
        if current != text:
            raise LmpipeError(
                f"{config.PARAMS_FILE} differs from the composition of conf/: run 'make params'"
            )
        print(f"{config.PARAMS_FILE} matches conf/")
        return
    atomic.write_text(config.PARAMS_FILE, text)
    print(f"wrote {config.PARAMS_FILE}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))


def cmd_generate(args: argparse.Namespace) -> None:
    """Complete the prompts with an ONNX export and print the completions (as they come, with --stream)."""
    from lmpipe.inference.engine import OrtEngine
    from lmpipe.inference.resolver import resolve_model
    from lmpipe.inference.sampling import GenerationParams

    given = {
        "max_new_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "stop": args.stop,
        "seed": args.seed,
    }
    # Options left out take GenerationParams' defaults: the sampling defaults are declared there only.
    params = GenerationParams(**{k: v for k, v in given.items() if v is not None})
    engine = OrtEngine(resolve_model(args.model), args.threads)
    chat = not args.raw
    if not args.stream:
        # Every prompt is checked (tokens, room in the context) before anything is printed.
        completions = engine.generate(args.prompts, params, chat=chat)
    for i, prompt in enumerate(args.prompts):
        if len(args.prompts) > 1:  # headed as `head` heads several files
            print(("\n" if i else "") + f"==> {prompt} <==")
        if args.stream:
            for delta in engine.stream(prompt, params, chat=chat):
                print(delta.text, end="", flush=True)
            print()
        else:
            print(completions[i].text)


def cmd_classify(args: argparse.Namespace) -> None:
    """Label the texts with the encoder classifier: one JSON object per text, per task the label, its
    probability and every label's probability (ONNX Runtime only: no torch)."""
    import json

    from lmpipe.encoder.resolve import resolve_classifier
    from lmpipe.encoder.serving import OrtClassifier

    classifier = OrtClassifier(resolve_classifier(args.classifier), args.threads)
    for text, result in zip(args.texts, classifier.classify(args.texts, args.task), strict=True):
        print(json.dumps({"text": text, **result}, ensure_ascii=False))


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model over HTTP with the OpenAI completions API (see lmpipe.serve)."""
    from lmpipe.serve import ServeConfig, serve

    given = {
        "model": args.model,
        "host": args.host,
        "port": args.port,
        "threads": args.threads,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_tokens_limit": args.max_tokens_limit,
        "max_batch": args.max_batch,
        "max_running": args.max_running,
        "max_queue": args.max_queue,
        "request_timeout": args.request_timeout,
        "shutdown_timeout": args.shutdown_timeout,
        "max_body_bytes": args.max_body_bytes,
        "api_key": args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV),
        "classifier": args.classifier,
    }
    serve(ServeConfig(**{k: v for k, v in given.items() if v is not None}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="write params.yaml from conf/ (Hydra composition)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke model.n_layer=6")
    p.add_argument("--check", action="store_true", help="exit 2 if params.yaml differs instead of writing it")
    p.set_defaults(func=cmd_params)

    model_help = f"ONNX export directory or models:/<name>@<alias> registry URI (default {DEFAULT_MODEL})"
    p = sub.add_parser(
        "generate",
        help="complete prompts with an ONNX export and print the completions",
        description="Sampling options left out take the defaults of lmpipe.inference.sampling.GenerationParams.",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (one completion each)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    # No defaults here: GenerationParams holds them (importing it would slow every subcommand's start).
    p.add_argument("--max-tokens", type=int, help="most tokens generated per prompt")
    p.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--stop", action="append", metavar="S", help="stop sequence (repeatable)")
    p.add_argument("--seed", type=int, help="sampling seed; without one, fresh entropy")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads; 0 = one per core")
    p.add_argument("--raw", action="store_true", help="complete the raw text, without the chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=cmd_generate)

    classifier_help = (
        "ONNX classifier directory (an encoder_finetune directory stands for its onnx/) or "
        "models:/lmpipe-classifier@<alias>"
    )
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI /v1/completions, /v1/chat/completions)")
    p.add_argument("--model", help=model_help)
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads; 0 = one per core (default)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt in tokens (default block_size - 1)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask (default 256)")
    p.add_argument("--max-batch", type=int, help="most prompts per completions request (default 8)")
    p.add_argument(
        "--max-running",
        type=int,
        help="most sequences decoded together, requests joining between steps; 1 = batching off (default 16)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        help="most requests waiting to join the batch; one more gets a 503 (default 64)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        help="seconds a request may wait to join the batch, then 503 (default 60)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        help="seconds running requests get to finish after SIGTERM before they are cancelled (default 10)",
    )
    p.add_argument("--max-body-bytes", type=int, help="largest request body; larger: 413 (default 1000000)")
    p.add_argument(
        "--api-key",
        help=f"key /v1 requests must send as 'Authorization: Bearer KEY' (default ${API_KEY_ENV}, else none)",
    )
    p.add_argument("--classifier", help=f"also serve POST /v1/classify: {classifier_help}")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "classify",
        help="label texts with the encoder classifier and print JSON (labels with probabilities)",
        description="Prints one JSON object per text: per task the label, its probability and every label's.",
    )
    p.add_argument("texts", nargs="+", metavar="TEXT", help="text to classify (one JSON line each)")
    p.add_argument("--task", help="only this task's answer (default: every task of the classifier)")
    p.add_argument(
        "--classifier", default=DEFAULT_CLASSIFIER, help=f"{classifier_help} (default {DEFAULT_CLASSIFIER})"
    )
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads; 0 = one per core")
    p.set_defaults(func=cmd_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmpipeError as exc:
        from lmpipe.config import one_line

        print(f"lmpipe {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
