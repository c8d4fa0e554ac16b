"""`protein-llava`: predict (FASTA → JSONL), chat, serve, demo (browser), export (run → Hub-ready folder), convert-internlm2.

Each subcommand imports its optional stack (Biopython, FastAPI + uvicorn, Gradio, huggingface_hub) only when it
runs, so the package and the other subcommands work without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from . import __version__
from .data.prompts import TEMPLATES


class CommandError(Exception):
    """A problem the user can fix (a missing file, a bad flag value): printed as one line, exit status 2."""


# --- shared arguments


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a saved ProteinLLM folder (model + processor)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="weights dtype (default: as saved)"
    )
    parser.add_argument(
        "--load-in-4bit", action="store_true",
        help="quantise the decoder to 4-bit NF4 on load (bitsandbytes; computes in --dtype, default float32); "
        "encoder and projector stay in full precision",
    )


def _load_protein_llm(args):
    from .loading import load_protein_llm

    try:
        loaded = load_protein_llm(args.model, device=args.device, dtype=args.dtype, load_in_4bit=args.load_in_4bit)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise CommandError(str(error)) from error
    if getattr(args, "overflow", None) is not None:
        loaded.processor.overflow = args.overflow
    return loaded


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServerLimits` field: its name (or the field's `flag`), type, default and help live there."""
    from .inference.server_limits import ServerLimits

    hints = typing.get_type_hints(ServerLimits)
    for limit in dataclasses.fields(ServerLimits):
        kind = hints[limit.name]
        convert = float if kind is float else _positive  # int and int | None: counts, >= 1
        flag = limit.metadata["flag"] or "--" + limit.name.replace("_", "-")
        default = "none" if limit.default is None else limit.default
        parser.add_argument(flag, dest=limit.name, type=convert, default=limit.default, help=f"{limit.metadata['help']} (default: {default})")


def _add_bind_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=port, help=f"port (default: {port})")


def _is_local(host: str) -> bool:
    """Whether binding to `host` keeps the service on this machine."""
    return host in ("127.0.0.1", "localhost", "::1")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# --- predict


def predict_command(args) -> int:
    from .inference.predict import FastaRecord, answered_ids, predict_fasta, read_fasta

    question = TEMPLATES[args.template] if args.template else args.question
    if not question.strip():
        raise CommandError("--question is empty")
    try:
        records = read_fasta(args.fasta) if args.fasta else [FastaRecord(args.id, args.sequence)]
    except (ValueError, FileNotFoundError) as error:
        raise CommandError(str(error)) from error
    out = args.out
    errors = args.errors or (out.with_name(out.stem + ".errors.jsonl") if out is not None else None)
    if out is not None:
        try:
            answered_ids(out, question)  # fails before the model loads when --out answers another question
        except ValueError as error:
            raise CommandError(str(error)) from error
        out.parent.mkdir(parents=True, exist_ok=True)
    summary = predict_fasta(
        _load_protein_llm(args),
        records,
        question,
        out,
        errors=errors,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    print(f"predict: {summary.line(str(out) if out else 'stdout', str(errors) if errors else None)}", file=sys.stderr)
    return 1 if summary.problems.get("generation_error") else 0


# --- chat

def chat_command(args) -> int:
    from .inference.chat import ChatSession, run_chat
    from .inference.predict import read_fasta
    from .sequences import ProteinSequenceError

    sequence = args.sequence
    if args.fasta is not None:
        try:
            records = read_fasta(args.fasta)
        except (ValueError, FileNotFoundError) as error:
            raise CommandError(str(error)) from error
        chosen = [r for r in records if args.record is None or r.id == args.record]
        if not chosen:
            raise CommandError(f"no record {args.record!r} in {args.fasta}")
        sequence = chosen[0].sequence
        print(f"protein: record {chosen[0].id} of {args.fasta}", file=sys.stderr)
    session = ChatSession(_load_protein_llm(args), max_new_tokens=args.max_new_tokens)
    if sequence is not None:
        try:
            residues = session.load_protein(sequence)
        except ProteinSequenceError as error:
            raise CommandError(str(error)) from error
        print(f"protein loaded: {len(residues)} residues", file=sys.stderr)
    else:
        print("no protein loaded: questions go to the decoder alone (/protein SEQ loads one)", file=sys.stderr)
    run_chat(session, sys.stdin.isatty())
    return 0


# --- serve


def serve_command(args) -> int:
    import os

    import uvicorn

    from .inference.serving import ServerLimits, create_app

    try:
        limits = ServerLimits(**{limit.name: getattr(args, limit.name) for limit in dataclasses.fields(ServerLimits)})
    except ValueError as error:
        raise CommandError(str(error)) from error
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(_load_protein_llm(args), limits, model_name=name, api_key=api_key)
    if not _is_local(args.host) and not api_key:
        print(
            f"serve: listening on {args.host}, beyond this machine, without an API key "
            f"(set --api-key or {API_KEY_VARIABLE})",
            file=sys.stderr,
        )
    print(f"serve: model {name!r} on http://{args.host}:{args.port}/v1 (OpenAI API) and /v1/answer", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


API_KEY_VARIABLE = "PROTEIN_LLAVA_API_KEY"


# --- demo


def demo_command(args) -> int:
    from .inference.webdemo import DemoSettings, build_app, launch

    try:
        given = {"max_new_tokens": args.max_new_tokens, "max_new_tokens_limit": args.max_new_tokens_limit}
        settings = DemoSettings(**{name: value for name, value in given.items() if value is not None})
    except ValueError as error:
        raise CommandError(str(error)) from error
    app = build_app(_load_protein_llm(args), settings, model_name=str(args.model))
    if not _is_local(args.host):
        print(f"demo: listening on {args.host}, beyond this machine; the demo has no authentication", file=sys.stderr)
    launch(app, host=args.host, port=args.port)
    return 0


# --- export


def export_command(args) -> int:
    import shutil

    from .model.configuration import ProteinLLMConfig
    from .model_card import write_model_card
    from .training.run_folder import RunFolder

    run, out = args.run, args.out
    source = RunFolder(run).export
    if not (source / "config.json").is_file():
        raise CommandError(f"{source}/config.json is missing: {run} is not a finished training run")
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    if model_type != ProteinLLMConfig.model_type:
        raise CommandError(f"{source} holds a plain {model_type!r} model (the text-only arm); export takes ProteinLLM runs")
    if args.push and not args.repo_id:
        raise CommandError("--push needs --repo-id user/name")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CommandError(f"{out} exists and is not empty; choose a new --out or pass --force to overwrite files in it")
    from .evaluation.report import report_card_rows
    from .training.run_folder import find_stage1_run, training_card_rows

    folder = RunFolder(run)
    try:
        summary = folder.summary()
        stage1_run = find_stage1_run(folder, folder.config(), args.stage1_run) if summary is not None and summary.stage == 2 else None
        training = training_card_rows(folder, stage1_run)
        results = report_card_rows(args.eval_report, source) if args.eval_report else None
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error

    shutil.copytree(source, out, dirs_exist_ok=True)
    config = ProteinLLMConfig.from_pretrained(out)
    card = write_model_card(out, config, repo=args.repo_id or str(out), training=training, results=results)
    print(f"export: {out} (model card {card}" + (f"; stage 1 from {stage1_run.path}" if stage1_run else "") + ")", file=sys.stderr)
    if args.push:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=args.repo_id, commit_message="Upload ProteinLLM (protein_llava export)")
        print(f"export: pushed to https://huggingface.co/{args.repo_id}", file=sys.stderr)
    return 0


# --- convert-internlm2


def convert_internlm2_command(args) -> int:
    from .convert.internlm2 import main as convert_main

    return convert_main([str(args.src), str(args.dst), *(["--dtype", args.dtype] if args.dtype else [])])


# --- the parser


def build_parser() -> argparse.ArgumentParser:
    from .inference.chat import CHAT_COMMANDS

    parser = argparse.ArgumentParser(
        prog="protein-llava",
        description="Ask a ProteinLLM about proteins: batch FASTA prediction, chat, an HTTP server, a browser demo, "
        "export of a training run, and InternLM2 conversion.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser(
        "predict",
        help="answer one question for every protein of a FASTA file (JSONL out, resumable)",
        description="Answer one question for every record of a FASTA file (or one --sequence), greedily and in "
        "batches. Rows {id, sequence_length, question, answer} are appended to --out and flushed per batch; "
        "ids already there are skipped, so a rerun resumes. Bad records (invalid residues, empty, too long, "
        "duplicate ids) are skipped and listed in --errors.",
    )
    _add_model_arguments(predict)
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--fasta", type=Path, help="FASTA file of proteins")
    source.add_argument("--sequence", help="one protein sequence (one-letter codes)")
    predict.add_argument("--id", default="query", help="the id of --sequence in the output (default: query)")
    asked = predict.add_mutually_exclusive_group(required=True)
    asked.add_argument("--question", help="the question, asked about each protein")
    asked.add_argument("--template", choices=tuple(TEMPLATES), help="a ProteinLMDataset UniProt instruction instead of --question")
    predict.add_argument("--out", type=Path, default=None, help="JSONL output, appended and resumed (default: stdout, no resume)")
    predict.add_argument("--errors", type=Path, default=None, help="JSONL of skipped records (default: OUT's stem + .errors.jsonl)")
    predict.add_argument("--batch-size", type=_positive, default=8, help="proteins per generate call (default: 8)")
    predict.add_argument("--max-new-tokens", type=_positive, default=128, help="longest answer in tokens (default: 128)")
    predict.add_argument(
        "--overflow", choices=("error", "truncate"), default=None,
        help="proteins over the encoder limit: skip as errors, or keep their first residues (default: as saved)",
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(handler=predict_command)

    chat = commands.add_parser(
        "chat",
        help="an interactive conversation about a protein (reads questions from stdin)",
        description="Talk to the model about a protein. Reads one question per line from stdin until end of "
        "input or /quit and prints each answer on stdout; the conversation history goes through the chat "
        "template. " + CHAT_COMMANDS,
    )
    _add_model_arguments(chat)
    protein = chat.add_mutually_exclusive_group()
    protein.add_argument("--sequence", help="the protein to talk about")
    protein.add_argument("--fasta", type=Path, help="take the protein from a FASTA file (first record, or --record)")
    chat.add_argument("--record", default=None, help="with --fasta: the id of the record to load")
    chat.add_argument("--max-new-tokens", type=_positive, default=256, help="longest answer in tokens (default: 256)")
    chat.set_defaults(handler=chat_command)

    serve = commands.add_parser(
        "serve",
        help="an HTTP server: the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models), /v1/answer, /health",
        description="Serve the model over HTTP. POST /v1/answer {\"sequences\": [...], \"question\": \"...\", "
        "\"max_new_tokens\": 64} answers {\"answers\": [...]}; concurrent requests are batched into one greedy "
        "generate call. GET /health reports readiness and batching counters.",
    )
    _add_model_arguments(serve)
    _add_bind_arguments(serve, port=8000)
    _add_limit_arguments(serve)
    serve.add_argument("--served-model-name", default=None, help="the model id of /v1/models and requests' 'model' (default: the folder's name)")
    serve.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_VARIABLE}, else none)")
    serve.add_argument("--overflow", choices=("error", "truncate"), default=None, help="proteins over the encoder limit: 422, or cut (default: as saved)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.set_defaults(handler=serve_command)

    demo = commands.add_parser(
        "demo",
        help="a browser demo: chat about a protein with streamed answers (Gradio)",
        description="Open a web page to ask the model about a protein: paste residues or FASTA (pick a record), "
        "ask with predict's templates or free text, follow up in a chat that keeps the protein, watch answers "
        "stream (Stop ends one), and see what the model read. Binds to this machine by default.",
    )
    _add_model_arguments(demo)
    _add_bind_arguments(demo, port=7860)
    # None: DemoSettings' own defaults (the one home of the numbers; webdemo imports Gradio, so not read here).
    demo.add_argument("--max-new-tokens", type=_positive, default=None, help="the answer-length slider's start (default: the demo's, 128)")
    demo.add_argument("--max-new-tokens-limit", type=_positive, default=None, help="the answer-length slider's end (default: the demo's, 512)")
    demo.add_argument("--overflow", choices=("error", "truncate"), default=None, help="proteins over the encoder limit: refuse, or cut (default: as saved)")
    demo.set_defaults(handler=demo_command)

    export = commands.add_parser(
        "export",
        help="a training run → a self-contained model folder with a filled model card (Hub-ready)",
        description="Copy a training run's export/ folder to --out and write its model card: architecture, both "
        "training stages (the stage-1 run is found through the stage-2 config's projector path, or "
        "--stage1-run), data counts, evaluation results from an eval report.json, usage and data licence.",
    )
    export.add_argument("--run", required=True, type=Path, help="the training run folder (usually the stage-2 run)")
    export.add_argument("--out", required=True, type=Path, help="the folder to write")
    export.add_argument("--eval-report", type=Path, default=None, help="an eval run's report.json for the results table")
    export.add_argument("--stage1-run", type=Path, default=None, help="the stage-1 run folder, when it cannot be found")
    export.add_argument("--repo-id", default=None, help="the Hub repository (user/name) shown in the usage snippet")
    export.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    export.add_argument("--push", action="store_true", help="upload --out to --repo-id with huggingface_hub")
    export.add_argument("--private", action="store_true", help="with --push: create the repository private")
    export.set_defaults(handler=export_command)

    convert = commands.add_parser(
        "convert-internlm2",
        help="convert an InternLM2 checkpoint to the native Llama layout",
        description="Convert an InternLM2 Hugging Face folder (e.g. internlm/internlm2-chat-7b) to a "
        "LlamaForCausalLM folder with a fast tokenizer and the ChatML template.",
    )
    convert.add_argument("src", type=Path, help="InternLM2 folder (config.json, weights, tokenizer.model)")
    convert.add_argument("dst", type=Path, help="output folder for the Llama checkpoint")
    convert.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None, help="cast weights (default: keep)")
    convert.set_defaults(handler=convert_internlm2_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"protein-llava {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"protein-llava {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
