"""Cloud TPU launcher: create / setup / run / logs / stop / delete a TPU VM or pod slice.

Every host of a slice runs the same program (JAX SPMD); this script only drives `gcloud
compute tpus tpu-vm ... --worker=all`. `--dry-run` prints the exact commands instead of
running them (one shell line each, copy-pasteable).

  T="--name=rlm-v5p --zone=us-east5-a --project=my-proj"
  python experiments/tpu.py create $T --accelerator-type=v5p-32 --version=v2-alpha-tpuv5
  python experiments/tpu.py setup  $T                      # this checkout's HEAD, on every host
  python experiments/tpu.py setup  $T --repo=https://github.com/ORG/rlm_jax.git --ref=main
  python experiments/tpu.py run    $T --config=configs/main.py --workdir=gs://BUCKET/run1 \\
      -- --config.sft.steps=2000 '--config.task.domain=arithmetic'
  python experiments/tpu.py logs   $T [--worker=all] [--follow]
  python experiments/tpu.py stop   $T                      # SIGTERM: checkpoint, then exit
  python experiments/tpu.py delete $T

Remote layout (relative to the home directory of each host): `rlm_jax/` (the code),
`rlm_venv/` (Python + `jax[tpu]`), `rlm_logs/<name>.log|.pid`. `run` starts the program with
`setsid nohup` (it survives the ssh session) and `RLM_COORDINATOR=auto`, so
`rlm_jax.distributed.initialize` joins all hosts with Cloud TPU auto-detection. On a
multi-host slice the workdir must be shared by all hosts (a gs:// path): orbax writes each
host's shards there.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

JAX_VERSION = '0.10.2'  # same pin as setup.py; `jax[tpu]` pulls the matching libtpu
_SAFE_PATH = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_./-]*$')
_SAFE_NAME = re.compile(r'^[a-z]([-a-z0-9]*[a-z0-9])?$')


class LauncherError(ValueError):
  """Bad launcher arguments (one line)."""


def _gcloud(args, verb: str, *extra: str) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *extra, f'--zone={args.zone}']
  if args.project:
    cmd.append(f'--project={args.project}')
  return cmd


def _ssh(args, remote: str, worker: str = 'all') -> list[str]:
  cmd = _gcloud(args, 'ssh', args.name) + [f'--worker={worker}']
  if args.iap:
    cmd.append('--tunnel-through-iap')
  return cmd + [f'--command={remote}']


def _install_lines(args) -> list[str]:
  """Shell lines run on every host after the code is in place."""
  py, venv, code = args.python, args.venv_dir, args.remote_dir
  extras = f'[{args.extras}]' if args.extras else ''
  return [
      'set -euo pipefail',
      f'command -v {py} >/dev/null || {{ sudo apt-get update -qq && '
      f'sudo apt-get install -y -qq {py} {py}-venv; }}',
      f'{py} -m venv {venv}',
      f'{venv}/bin/pip install -q --upgrade pip',
      f'{venv}/bin/pip install -q -e {shlex.quote(code + extras)} '
      f'{shlex.quote(f"jax[tpu]=={JAX_VERSION}")}',
      f'{venv}/bin/python -c {shlex.quote("import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)")}',
  ]


def create_commands(args) -> list[list[str]]:
  cmd = _gcloud(args, 'create', args.name) + [f'--accelerator-type={args.accelerator_type}',
                                              f'--version={args.version}']
  if args.spot:
    cmd.append('--spot')
  return [cmd]


def setup_commands(args) -> list[list[str]]:
  code = args.remote_dir
  if args.repo:
    ref = shlex.quote(args.ref or 'main')
    fetch = [f'[ -d {code}/.git ] || git clone -q {shlex.quote(args.repo)} {code}',
             f'git -C {code} fetch -q origin {ref}',
             f'git -C {code} checkout -q FETCH_HEAD']
    lines = _install_lines(args)
    return [_ssh(args, '; '.join(lines[:1] + fetch + lines[1:]))]
  # Ship this checkout: a tarball of one commit (uncommitted changes are not included).
  tarball = f'/tmp/{args.name}-rlm_jax.tar.gz'
  archive = ['git', '-C', args.source, 'archive', '--format=tar.gz', f'--prefix={code}/',
             '-o', tarball, args.ref or 'HEAD']
  scp = _gcloud(args, 'scp', tarball, f'{args.name}:rlm_jax.tar.gz') + ['--worker=all']
  if args.iap:
    scp.append('--tunnel-through-iap')
  lines = _install_lines(args)
  unpack = [f'rm -rf {code}', 'tar xzf rlm_jax.tar.gz', 'rm rlm_jax.tar.gz']
  return [archive, scp, _ssh(args, '; '.join(lines[:1] + unpack + lines[1:]))]


def run_commands(args) -> list[list[str]]:
  log, pid = f'rlm_logs/{args.name}.log', f'rlm_logs/{args.name}.pid'
  env = ['RLM_COORDINATOR=auto'] + list(args.env)
  program = [f'$HOME/{args.venv_dir}/bin/python', '-m', 'rlm_jax.main', f'--config={args.config}',
             f'--workdir={args.workdir}', *args.overrides]
  # The python path keeps '$HOME' unquoted on purpose: the remote shell expands it.
  quoted = [program[0]] + [shlex.quote(a) for a in program[1:]]
  remote = '; '.join([
      'set -eu', 'mkdir -p rlm_logs', f'cd {args.remote_dir}',
      f'env {" ".join(shlex.quote(e) for e in env)} setsid nohup {" ".join(quoted)} '
      f'> $HOME/{log} 2>&1 < /dev/null & echo $! > $HOME/{pid}',
      f'echo "started pid $(cat $HOME/{pid}) on $(hostname), log ~/{log}"'])
  return [_ssh(args, remote)]


def logs_commands(args) -> list[list[str]]:
  follow = ' -f' if args.follow else ''
  return [_ssh(args, f'tail -n {args.lines}{follow} rlm_logs/{args.name}.log', args.worker)]


def stop_commands(args) -> list[list[str]]:
  pid = f'rlm_logs/{args.name}.pid'
  return [_ssh(args, f'[ -f {pid} ] && kill -TERM "$(cat {pid})" && echo "sent SIGTERM to '
                     f'$(cat {pid}) on $(hostname)" || echo "no run on $(hostname)"')]


def delete_commands(args) -> list[list[str]]:
  return [_gcloud(args, 'delete', args.name) + ['--quiet']]


_BUILDERS = {'create': create_commands, 'setup': setup_commands, 'run': run_commands,
             'logs': logs_commands, 'stop': stop_commands, 'delete': delete_commands}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  argv = list(argv)
  overrides: list[str] = []
  if '--' in argv:  # everything after '--' is passed to rlm_jax.main unchanged
    i = argv.index('--')
    argv, overrides = argv[:i], argv[i + 1:]
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU VM / slice name')
  common.add_argument('--zone', required=True, help='e.g. us-east5-a')
  common.add_argument('--project', default='', help='GCP project (default: gcloud config)')
  common.add_argument('--iap', action='store_true', help='ssh/scp with --tunnel-through-iap')
  common.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  common.add_argument('--remote-dir', default='rlm_jax', help='code dir under $HOME')
  common.add_argument('--venv-dir', default='rlm_venv', help='virtualenv dir under $HOME')
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='verb', required=True)
  p = sub.add_parser('create', parents=[common], help='create the TPU VM / slice')
  p.add_argument('--accelerator-type', required=True, help='e.g. v4-8, v5litepod-16, v5p-32')
  p.add_argument('--version', required=True,
                 help='TPU runtime, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5, '
                      'v2-alpha-tpuv5-lite')
  p.add_argument('--spot', action='store_true', help='spot capacity (preemptible)')
  p = sub.add_parser('setup', parents=[common], help='install the package on every host')
  p.add_argument('--repo', default='', help='git URL to clone on each host (default: ship '
                                            'this checkout with scp)')
  p.add_argument('--source', default='.', help='local checkout to ship (without --repo)')
  p.add_argument('--ref', default='', help='git ref (default: main with --repo, HEAD without)')
  p.add_argument('--extras', default='', help="pip extras, e.g. 'hf'")
  p.add_argument('--python', default='python3.11', help='python on the hosts (>= 3.11)')
  p = sub.add_parser('run', parents=[common],
                     help='start `python -m rlm_jax.main` on every host (args after -- are '
                          'config overrides)')
  p.add_argument('--config', required=True, help='config file, relative to the repo')
  p.add_argument('--workdir', required=True, help='run dir; gs://... on multi-host slices')
  p.add_argument('--env', action='append', default=[], help='KEY=VALUE for the run (repeat)')
  p = sub.add_parser('logs', parents=[common], help='tail the run log')
  p.add_argument('--worker', default='0', help="host index or 'all'")
  p.add_argument('--lines', type=int, default=100)
  p.add_argument('--follow', action='store_true')
  sub.add_parser('stop', parents=[common], help='SIGTERM the run on every host')
  sub.add_parser('delete', parents=[common], help='delete the TPU VM / slice')
  args = parser.parse_args(argv)
  args.overrides = overrides
  if overrides and args.verb != 'run':
    parser.error(f'arguments after -- are only for run (got {shlex.join(overrides)})')
  _validate(args)
  return args


def _validate(args) -> None:
  if not _SAFE_NAME.match(args.name):
    raise LauncherError(f'--name={args.name!r}: lowercase letters, digits and -, starting '
                        f'with a letter')
  for flag in ('remote_dir', 'venv_dir'):
    value = getattr(args, flag)
    if not _SAFE_PATH.match(value) or '..' in value.split('/'):
      raise LauncherError(f'--{flag.replace("_", "-")}={value!r}: a plain path under $HOME '
                          f'(letters, digits, _ . / -)')
  if args.verb == 'setup' and not re.match(r'^[A-Za-z0-9._+-]+$', args.python):
    raise LauncherError(f'--python={args.python!r}: a command name such as python3.11')
  if args.verb == 'setup' and args.extras and not re.match(r'^[A-Za-z0-9_,-]+$', args.extras):
    raise LauncherError(f"--extras={args.extras!r}: comma-separated names, e.g. 'hf'")
  if args.verb == 'run':
    for e in args.env:
      if not re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', e):
        raise LauncherError(f'--env={e!r}: must be KEY=VALUE')
  if args.verb == 'logs' and args.worker != 'all' and not args.worker.isdigit():
    raise LauncherError(f"--worker={args.worker!r}: a host index or 'all'")


def main(argv: Sequence[str] | None = None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except LauncherError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for cmd in _BUILDERS[args.verb](args):
    line = shlex.join(cmd)
    if args.dry_run:
      print(line)
      continue
    print(f'+ {line}', flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
      print(f'error: exit status {rc} from: {line}', file=sys.stderr)
      return rc
  return 0


if __name__ == '__main__':
  sys.exit(main())
