"""Studies: a grid of runs (budget x density x strategy x interpolation x model x seed), run
resumably on local processes or Ray, collected into one tidy table and a report."""

from sparseslice.study.orchestrate import StudySummary, run_study
from sparseslice.study.results import collect_results, load_study, read_results, run_table, write_results
from sparseslice.study.spec import PRESETS, TRAINING_PRESETS, RunSpec, StudySpec, load_spec, parse_spec, run_config
from sparseslice.study.store import RunOutput, StudyStore

__all__ = ["PRESETS", "TRAINING_PRESETS", "RunOutput", "RunSpec", "StudySpec", "StudyStore", "StudySummary",
           "collect_results", "load_spec", "load_study", "parse_spec", "read_results", "run_config", "run_study",
           "run_table", "write_results"]
