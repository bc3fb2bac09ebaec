"""``polyray heads ...``: train, inspect, share and apply task heads on a running server.

Unlike ``polyray clients`` (which works on the database directly), these commands go through the
HTTP API with ``polyray.Client``: training needs the server's model and trainer, and going
through the API means the same authentication, ownership and sharing rules as any other client.

The server is ``--url`` (default ``$POLYRAY_URL``, else http://127.0.0.1:8000) and the key
``--key`` (default ``$POLYRAY_API_KEY``); both may be given before or after the action. Tables
are for people; ``--json`` prints the server's views for scripts. An error prints one line,
``polyray: <type>: <message>``, on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from polyray.cli.common import Subcommands
    from polyray.client import Client, Head

URL_ENV = "POLYRAY_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
KINDS = ("classifier", "multilabel", "regressor", "projection")
BAR_WIDTH_CHARS = 30
# The figure that best summarizes a head of each kind in one table column, in order of preference.
_SUMMARY_METRICS = ("accuracy", "macro_f1", "r2", "explained_variance", "mae")


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is read as JSON when it parses (``0.3``, ``7``, ``true``), else kept as text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _fmt_number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _summary(head: Head) -> str:
    for name in _SUMMARY_METRICS:
        if name in head.metrics:
            return f"{name} {_fmt_number(head.metrics[name])}"
    return "-"


def _status(head: Head) -> str:
    return head.status if head.done else f"{head.status} {head.progress:.0%}"


def _print_heads(heads: Sequence[Head], out: TextIO) -> None:
    print(
        f"{'head':<32} {'id':<29} {'kind':<11} {'model':<10} {'status':<13} {'examples':>8} {'out':>4}  metric  shared",
        file=out,
    )
    for h in heads:
        shared = ",".join(h.shared_with) or "-"
        print(
            f"{h.ref:<32} {h.id:<29} {h.kind:<11} {h.model:<10} {_status(h):<13} {h.num_examples:>8} "
            f"{h.dim_out:>4}  {_summary(h)}  {shared}",
            file=out,
        )


def _print_head(head: Head, out: TextIO) -> None:
    when = "%Y-%m-%d %H:%M:%S %Z"
    rows = [
        ("head", head.ref),
        ("id", head.id),
        ("kind", head.kind),
        ("model", head.model),
        ("status", _status(head)),
        ("error", head.error or "-"),
        ("labels", ", ".join(head.labels) or "-"),
        ("dimensions", f"{head.dim_in} -> {head.dim_out}"),
        ("examples", str(head.num_examples)),
        ("options", " ".join(f"{k}={v}" for k, v in sorted(head.options.items())) or "-"),
        ("shared with", ", ".join(head.shared_with) or "-"),
        ("created", head.created_at.strftime(when) if head.created_at else "-"),
        ("updated", head.updated_at.strftime(when) if head.updated_at else "-"),
    ]
    for name, value in rows:
        print(f"{name:<12} {value}", file=out)
    if head.metrics:
        print("metrics", file=out)
        for metric, figure in sorted(head.metrics.items()):
            print(f"  {metric:<24} {_fmt_number(figure)}", file=out)


def _print_json(value: object, out: TextIO) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), file=out)


class ProgressBar:
    """Training progress on ``stream``: ``name [#####.....]  45% training``, redrawn in place with ``\\r``.

    Redrawn only when the status or the whole percent changes, so polling twice a second does not
    flood a log file; ``finish`` ends the line.
    """

    def __init__(self, stream: TextIO, width_chars: int = BAR_WIDTH_CHARS) -> None:
        self.stream = stream
        self.width_chars = width_chars
        self._last: tuple[str, int] | None = None
        self._last_len = 0

    def __call__(self, head: Head) -> None:
        fraction = 1.0 if head.status == "ready" else min(max(head.progress, 0.0), 1.0)
        percent = int(fraction * 100)
        if (head.status, percent) == self._last:
            return
        self._last = (head.status, percent)
        filled = int(fraction * self.width_chars)
        line = f"{head.ref} [{'#' * filled}{'.' * (self.width_chars - filled)}] {percent:>3}% {head.status}"
        self.stream.write("\r" + line.ljust(self._last_len))
        self.stream.flush()
        self._last_len = len(line)

    def finish(self) -> None:
        if self._last is not None:
            self.stream.write("\n")
            self.stream.flush()


def _wait_and_report(client: Client, head: Head, args: argparse.Namespace) -> Head:
    """Follow training with a progress bar on stderr (unless ``--no-wait``), then print the head."""
    if not args.no_wait:
        bar = ProgressBar(sys.stderr)
        try:
            head = client.wait_for_head(head, on_progress=bar, timeout_s=args.timeout_s)
        finally:
            bar.finish()
    if args.json:
        _print_json(head.as_dict(), sys.stdout)
    else:
        _print_head(head, sys.stdout)
        if not head.done:
            print(f"\nfollow it with: polyray heads show {head.id}", file=sys.stdout)
    return head


def _train(client: Client, args: argparse.Namespace) -> int:
    options = dict(args.option or [])
    head = client.train_head(args.name, args.kind, args.data, model=args.model, options=options or None, wait=False)
    _wait_and_report(client, head, args)
    return 0


def _retrain(client: Client, args: argparse.Namespace) -> int:
    _wait_and_report(client, client.retrain_head(args.head, args.model, wait=False), args)
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    heads = client.heads(model=args.model)
    if args.json:
        _print_json([h.as_dict() for h in heads], sys.stdout)
    elif heads:
        _print_heads(heads, sys.stdout)
    else:
        print("(no heads)", file=sys.stderr)
    return 0


def _show_one(head: Head, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(head.as_dict(), sys.stdout)
    else:
        _print_head(head, sys.stdout)
    return 0


def _show(client: Client, args: argparse.Namespace) -> int:
    return _show_one(client.head(args.head, model=args.model), args)


def _share(client: Client, args: argparse.Namespace) -> int:
    return _show_one(client.share_head(args.head, args.clients), args)


def _unshare(client: Client, args: argparse.Namespace) -> int:
    return _show_one(client.unshare_head(args.head, args.clients), args)


def _delete(client: Client, args: argparse.Namespace) -> int:
    head_id = client.delete_head(args.head, model=args.model)
    if args.json:
        _print_json({"id": head_id, "object": "head", "deleted": True}, sys.stdout)
    else:
        print(f"deleted {args.head} ({head_id})")
    return 0


def _infer(client: Client, args: argparse.Namespace) -> int:
    """Always JSON: head outputs are nested data (scores per label, vectors) that no table shows well."""
    result = client.infer(args.texts, args.heads, model=args.model, return_embedding=args.embedding)
    data: list[dict[str, Any]] = []
    for index, (text, outputs) in enumerate(zip(args.texts, result.outputs, strict=True)):
        item: dict[str, Any] = {"index": index, "text": text, "heads": outputs}
        if result.embeddings is not None:
            item["embedding"] = result.embeddings[index].tolist()
        data.append(item)
    timing = {"compute_ms": result.compute_ms, "heads_ms": result.heads_ms, "inference_ms": result.inference_ms}
    _print_json(
        {"model": result.model, "data": data, "usage": {"prompt_tokens": result.prompt_tokens}, "timing": timing},
        sys.stdout,
    )
    return 0


_ACTIONS: Mapping[str, Callable[[Client, argparse.Namespace], int]] = {
    "train": _train,
    "list": _list,
    "show": _show,
    "share": _share,
    "unshare": _unshare,
    "retrain": _retrain,
    "delete": _delete,
    "infer": _infer,
}


def cmd_heads(args: argparse.Namespace) -> int:
    from polyray.client import Client, PolyrayClientError

    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    try:
        # --key "" means no key at all (a loopback server with auth = "none"); no --key: $POLYRAY_API_KEY.
        with Client(url, api_key=args.key) as client:
            return _ACTIONS[args.action](client, args)
    except PolyrayClientError as exc:
        print(f"polyray: {exc.type}: {exc.message}", file=sys.stderr)
    except BrokenPipeError:  # the reader of stdout left (``| head``): not a bad request; ``main`` ends quietly
        raise
    except (OSError, ValueError) as exc:  # an unreadable or malformed --data file
        print(f"polyray: invalid_request: {exc}", file=sys.stderr)
    return 1


def _connection_options(suppress: bool) -> argparse.ArgumentParser:
    """``--url``, ``--key``, ``--json``: on the group (real defaults) and on each action (SUPPRESS).

    argparse copies a sub-parser's defaults over the parent's values, so the actions' copies
    default to SUPPRESS: an option given before the action is then not reset by the action.
    """
    parser = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument("--url", default=default, help=f"server base URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--key", default=default, help="client API key (default: $POLYRAY_API_KEY)")
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS if suppress else False, help="print JSON"
    )
    return parser


def register(sub: Subcommands) -> None:
    """Register ``polyray heads`` on the top-level sub-parsers."""
    heads = sub.add_parser(
        "heads", parents=[_connection_options(False)], help="train, share and apply task heads (through the HTTP API)"
    )
    actions = heads.add_subparsers(dest="action", required=True)
    common = [_connection_options(True)]

    def waiting(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
        parser.add_argument(
            "--timeout-s", type=float, default=900.0, help="give up waiting after this long (training goes on)"
        )

    train = actions.add_parser("train", parents=common, help="upload examples and train a head")
    train.add_argument("name", help="head name: lowercase letters, digits, '_', '.', '-'")
    train.add_argument("--kind", required=True, choices=KINDS)
    train.add_argument("--data", required=True, help=".jsonl or .json (a list) of {'text', 'label'} objects")
    train.add_argument("--model", default="minilm", help="model or version, e.g. minilm or minilm@1")
    train.add_argument(
        "--option",
        action="append",
        type=_option,
        metavar="KEY=VALUE",
        help="training option, repeatable: validation_fraction, dimensions, threshold, seed, regularization",
    )
    waiting(train)

    listing = actions.add_parser("list", parents=common, help="own heads and heads shared with you")
    listing.add_argument("--model", help="only heads bound to this model version")

    show = actions.add_parser("show", parents=common, help="one head: status, labels, metrics, shares")
    show.add_argument("head", help="id, own name, or owner/name")
    show.add_argument("--model", help="which version of the name (default: the newest)")

    for action, text in (("share", "let clients apply a head"), ("unshare", "stop sharing a head")):
        parser = actions.add_parser(action, parents=common, help=text)
        parser.add_argument("head", help="id, own name, or owner/name")
        parser.add_argument("clients", nargs="+", metavar="CLIENT")

    retrain = actions.add_parser("retrain", parents=common, help="train the head again for another model version")
    retrain.add_argument("head", help="id, own name, or owner/name")
    retrain.add_argument("--model", required=True, help="the version to bind the new head to, e.g. minilm@2")
    waiting(retrain)

    delete = actions.add_parser("delete", parents=common, help="delete a head")
    delete.add_argument("head", help="id, own name, or owner/name")
    delete.add_argument("--model", help="which version of the name (default: the newest)")

    infer = actions.add_parser("infer", parents=common, help="apply heads to texts; prints JSON")
    infer.add_argument("texts", nargs="+", metavar="TEXT")
    infer.add_argument("--head", dest="heads", action="append", required=True, help="a head to apply (repeatable)")
    infer.add_argument("--model", default="minilm")
    infer.add_argument("--embedding", action="store_true", help="also print each text's embedding")

    heads.set_defaults(func=cmd_heads)
