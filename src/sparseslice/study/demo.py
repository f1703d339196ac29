"""``sparseslice demo``: phantoms, a small study and its report, offline, in a few minutes on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

from sparseslice.study.orchestrate import StudySummary, run_study
from sparseslice.study.report import write_report
from sparseslice.study.spec import load_spec
from sparseslice.synthetic import write_phantom_dataset

DEMO_CASES = 20
DEMO_SHAPE = (32, 32, 12)


def run_demo(out: str | os.PathLike[str], *, workers: int = 2, progress: bool = True) -> tuple[Path, StudySummary]:
    """Write phantoms to ``out/phantoms``, run the ``demo`` preset into ``out/study``, write its report.

    Rerunning into the same folder resumes the study (finished runs are kept).

    Returns
    -------
    (Path, StudySummary)
        The report's path and what the study run did.
    """
    out = Path(out)
    data = out / "phantoms"
    if not (data / "dataset.json").is_file():
        write_phantom_dataset(data, cases=DEMO_CASES, seed=0, shape=DEMO_SHAPE, n_labels=2)
    spec = load_spec("demo", data=data)
    summary = run_study(spec, out / "study", workers=workers, progress=progress)
    return write_report(out / "study"), summary
