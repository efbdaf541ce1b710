"""Executes the notebooks of notebooks/ against a run (used by their tests and make_figures)."""
from __future__ import annotations

import os

# The checkout that holds this package: the kernel imports rlm_jax from there.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_notebook(path: str | os.PathLike, workdir: str | os.PathLike, *, timeout: int = 600,
                 save_to: str | os.PathLike | None = None):
  """Executes a notebook of notebooks/ against a run (nbclient; RLM_WORKDIR set, Agg backend).

  The kernel starts in the notebook's folder and finds rlm_jax through PYTHONPATH, so the
  repository need not be installed.

  Args:
    path: the .ipynb file.
    workdir: the run directory handed to the notebook.
    timeout: seconds per cell.
    save_to: also write the executed notebook there.

  Returns:
    The executed nbformat NotebookNode; a failing cell raises nbclient's CellExecutionError
    (its message holds the traceback).
  """
  import nbclient
  import nbformat

  path = os.path.abspath(os.fspath(path))
  nb = nbformat.read(path, as_version=4)
  env = {'RLM_WORKDIR': os.path.abspath(os.fspath(workdir)), 'MPLBACKEND': 'Agg',
         'PYTHONPATH': os.pathsep.join(filter(None, [_REPO, os.environ.get('PYTHONPATH', '')]))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel process inherits the environment
  try:
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                            resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  if save_to is not None:
    nbformat.write(nb, os.fspath(save_to))
  return nb
