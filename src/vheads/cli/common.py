"""What every command of the command line shares: the one-line error handling, option checks and help texts."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException, UsageError

from vheads import figures
from vheads.cli.output import emit, err

STORE_HELP = "DuckDB results store."
MODEL_HELP = "Hub id or local folder of an image-text-to-text model (default: the embedded demo LLaVA)."
FORMAT_HELP = "table, csv or json."
RUN_HELP = ("Run name or id; name:TEXT or id:N reads it one way only (digits that name one run and number another "
            "are refused as ambiguous).")
LIMIT_HELP = ("At most this many questions, drawn with --seed (default: 1,000 for shapes, every question for the "
              "other datasets).")
MAX_PIXELS_HELP = ("Skip images with more pixels than this, read from the file header before decoding (0: no cap); "
                   "counted as 'image too large'.")
RUN_FIELDS = {"ablate_heads": "ablate"}


class OneLineErrors(TyperGroup):
    """The vheads command group: a mistyped option or a value out of an option's range is one `error:` line and
    exit code 2, like every other user error, instead of click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed: nothing else to say
                exc.show()
                sys.exit(exc.exit_code)
            command = f"{exc.ctx.command_path} --help" if exc.ctx is not None else "vheads --help"
            err.print(Text.assemble(("error:", "bold red"), " ", exc.format_message(), f" (see {command})"),
                      soft_wrap=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def fail(message: str, code: int = 2) -> None:
    """Print one clear error line (the message literally) and exit non-zero."""
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


# The errors each package raises for a user's mistake, by the module that defines them. `errors` catches those of the
# modules already imported: an error of a module never loaded cannot have been raised, and importing models and
# capture (torch, transformers: seconds) only to name their errors would slow every command that reads the store.
USER_ERRORS = (("vheads.store.schema", "StoreError"), ("vheads.data.sample", "DataError"),
               ("vheads.models.families", "ModelError"), ("vheads.capture.session", "CaptureError"))
INTERRUPTED = ("vheads.pipeline.run", "Interrupted")


def loaded_errors(*names: tuple[str, str]) -> tuple[type[BaseException], ...]:
    """The error classes `(module, class)` of the modules imported so far (the others cannot have been raised)."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in names)
    return tuple(error for error in found if isinstance(error, type) and issubclass(error, BaseException))


@contextmanager
def errors() -> Iterator[None]:
    """Turn the documented user-facing errors into one line and exit code 2 (130 for an interrupt)."""
    try:
        yield
    except loaded_errors(INTERRUPTED) as exc:
        err.print(Text(str(exc), style="yellow"), soft_wrap=True)
        raise typer.Exit(130) from None
    except loaded_errors(*USER_ERRORS) + (ValueError, FileNotFoundError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or type(exc).__name__}")


def setup_logging(verbose: bool) -> None:
    """Warnings (skipped samples, ...) as plain lines on stderr; info too with --verbose."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def out_folder(path: Path, option: str = "--out") -> Path:
    """`path` when it is a folder or does not exist yet; ValueError naming the option when it is a file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; name a folder (it is created if missing)")
    return path


def existing_store(store: str) -> str:
    """`store` when the file exists; FileNotFoundError saying how to make one otherwise."""
    if not Path(store).exists():
        raise FileNotFoundError(f"store {store} does not exist; run `vheads run` first or pass --store")
    return store


def explicit_options(ctx: typer.Context, rename: dict[str, str] | None = None) -> tuple[str, ...]:
    """The options of this command given on the command line (not left at their defaults), as RunConfig fields."""
    rename = {**RUN_FIELDS, **(rename or {})}
    sources = {name: getattr(ctx.get_parameter_source(name), "name", None) for name in ctx.params}
    given = [name for name, source in sources.items() if source not in (None, "DEFAULT", "DEFAULT_MAP")]
    return tuple(sorted(rename.get(name, name) for name in given))


def parse_stages_option(text: str | None) -> tuple[int, int] | None:
    """`--stages A,B` as a pair (checked against the model's depth when it is known)."""
    from vheads.metrics import parse_stages

    return None if text is None else parse_stages(text)


def at_least(value: float | None, option: str, low: float) -> None:
    """ValueError naming the option when a number given for it is below `low`."""
    if value is not None and value < low:
        raise ValueError(f"{option} {value}: must be at least {low}")


def check_choice(value: str, what: str) -> str:
    """`value` when it is a known --readout / --ablation; ValueError listing the choices otherwise."""
    from vheads.capture import ABLATION_MODES, READOUTS

    allowed = {"readout": READOUTS, "ablation": ABLATION_MODES}[what]
    if value not in allowed:
        raise ValueError(f"unknown --{what} {value!r}; expected one of {', '.join(allowed)}")
    return value


def head_headers() -> dict[str, str]:
    """The short table headers of a head ranking's columns, the listed figures' labels among them."""
    return {"rank": "#", "layer": "layer", "head": "head", "score": "score",
            **{f.listed: f.label for f in figures.listed()}, "stage": "stage", "visual": "visual"}


def head_legend() -> str:
    """The notes under a head ranking: the score, then each listed figure's label and help."""
    return f"score: share of the scored samples with the head in the top K by W; {figures.legend()}; —: undefined"


def print_heads(table: Any, title: str, fmt: str = "table") -> None:
    """A head ranking: short headers and a legend in a table, the full column names in CSV and JSON."""
    legend = head_legend()
    if any(str(column).startswith("cost_") for column in table.columns):
        legend += "; cost MODE: accuracy lost with the head alone ablated in MODE (vheads ablate --each)"
    emit(table, fmt, title=title, headers=head_headers(), legend=legend)
