"""The ``selmix`` command: ``pretrain``, ``finetune``, ``baseline``, ``evaluate`` and ``demo``.

A thin layer over the library: argparse and a YAML configuration in, library calls, files
and a metrics table out. Every setting of a command has one key (``steps``, ``lr_head``...)
that can come from four places, later ones winning::

    built-in defaults  <  --config FILE.yaml  <  explicit flags  <  --set key=value

User errors (a missing folder, an unknown model, objective or policy, a checkpoint for
another class count, a bad setting, a corrupt file, a batch too large for the memory) end
with one line on stderr and exit status 2, never a traceback. Set ``SELMIX_DEBUG=1`` to see
the traceback instead.

The output folder (``--out``) holds one run. Everything is checked first (the settings,
the data, the starting model and, with ``--resume``, that the checkpoint continues this
very run); a command that fails there leaves ``--out`` as it was, byte for byte. Only then
does a fresh run of ``pretrain``, ``finetune`` or ``baseline`` remove the previous run's
files from ``--out`` (``model.pt``, ``metrics.json``, ``config.yaml``, ``log.jsonl``,
``finetune_state.pt``, ``details.json``, ``timings.json``) and write its ``config.yaml``,
so a run that fails later leaves its own files only (a resumable ``finetune_state.pt``
and ``log.jsonl``), never a mix of two runs. ``model.pt`` and ``metrics.json`` are written
at the end; every file is written atomically (:mod:`selmix._io`).

One module per command (:mod:`~selmix.cli.pretrain`, :mod:`~selmix.cli.finetune`,
:mod:`~selmix.cli.baseline`, :mod:`~selmix.cli.evaluate`, :mod:`~selmix.cli.demo`), each
with its options and its run; below them :mod:`~selmix.cli.options` (the :class:`Option`
type and the shared options) and :mod:`~selmix.cli.run` (the data, the starting model and
the ``--out`` folder); above them :mod:`~selmix.cli.parser` (the parser and
:func:`resolve_settings`) and :mod:`~selmix.cli.app` (:func:`main`, the error handling).
"""

from selmix.cli.app import main
from selmix.cli.options import EXIT_USAGE as EXIT_USAGE
from selmix.cli.options import PROG as PROG
from selmix.cli.options import Option as Option
from selmix.cli.options import UsageError as UsageError
from selmix.cli.parser import resolve_settings as resolve_settings
from selmix.cli.run import RUN_FILES as RUN_FILES

__all__ = ["main"]
