"""Where the benchmark peers live: `bash benchmarks/setup_peers.sh` installs them there.

Default: `.peers/` in the repository root (git-ignored); `RLM_PEERS_DIR` moves it.
"""

import os

SETUP = 'bash benchmarks/setup_peers.sh'


def peers_dir() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  return os.environ.get('RLM_PEERS_DIR') or os.path.join(os.path.dirname(here), '.peers')


def tunix_python() -> str:
  return os.path.join(peers_dir(), 'tunix', 'bin', 'python')


def trl_path() -> str:
  return os.path.join(peers_dir(), 'trl-site')


def missing(name: str, where: str) -> str:
  return f'{name}: not run: nothing at {where}; install it with `{SETUP} {name}`'
