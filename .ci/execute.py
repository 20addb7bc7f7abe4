"""Execute notebooks in place and save them with their outputs (figures included), then nbdev_clean them.

    python .ci/execute.py                        # every notebook in nbs/ (not _scratch ones)
    python .ci/execute.py nbs/10_quickstart.ipynb nbs/11_viz.ipynb -j 2

Each notebook runs in a fresh Python process with execnb (like `nbdev_test`): working directory
nbs/, MPLBACKEND=Agg, figures saved as PNG at a modest dpi, progress bars off (TQDM_DISABLE=1).
Cells flagged with a `tst_flags` flag of settings.ini (`#| gpu`, `#| slow`), cells marked
`#| eval: false`, cells that call nbdev_export, and notebooks whose front matter says
`skip_exec: true` are not run, as in `nbdev_test`; a skipped cell keeps whatever outputs it has.
A notebook whose cell raises is NOT written: its traceback is printed, and the command exits 1
after the others have run. It prints one line per notebook (time, figures) and a total.
"""
import argparse, json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
DPI = 80  # figure.dpi of every figure drawn while executing: modest PNGs, readable text


def skip_flags():
    "The `tst_flags` of settings.ini: cells carrying one of them are not executed."
    cfg = ConfigParser(); cfg.read(ROOT / 'settings.ini')
    return set(cfg.get('DEFAULT', 'tst_flags', fallback='').split())


def figures(path):
    "Number of PNG images among a notebook's saved outputs."
    nb = json.loads(Path(path).read_text())
    return sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', []))


def _execute_here(path, flags):
    "Run in a child process: execute `path` with execnb and write it back; exit 1 without writing on an error."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.process import extract_directives
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.process import NBProcessor
    fm = getattr(NBProcessor(path, procs=FrontmatterProc, process=True).nb, 'frontmatter_', {}) or {}
    if str(fm.get('skip_exec', '')).lower() in ('true', '1', 'yes'): return 3
    nb = read_nb(path)

    def skip(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export' + '(' in cell.source: return True
        direc = extract_directives(cell, remove=False) or {}
        if direc.get('eval:', [''])[0].lower() == 'false': return True
        return bool(flags & direc.keys())

    shell = CaptureShell(path, mpl_format='png')
    shell.run(f"import matplotlib as _mpl; _mpl.rcParams['figure.dpi'] = {DPI}; del _mpl")
    try:
        shell.run_all(nb, exc_stop=True, preproc=skip)
    except BaseException:
        sys.stderr.write(shell.prettytb(fname=path) + '\n')
        return 1
    write_nb(nb, path)
    return 0


def run_one(path, flags, timeout):
    "Execute one notebook in a fresh process (cwd nbs/), then nbdev_clean it; (status, seconds, stderr)."
    env = dict(os.environ, MPLBACKEND='Agg', TQDM_DISABLE='1', PYTHONUNBUFFERED='1',
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get('PYTHONPATH')) if p))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, __file__, '--child', str(path), '--flags', ' '.join(sorted(flags))],
                           cwd=path.parent, env=env, capture_output=True, text=True, timeout=timeout)
        status, err = {0: 'ok', 3: 'skipped (skip_exec)'}.get(p.returncode, 'FAILED'), p.stderr
    except subprocess.TimeoutExpired as e:
        status, err = 'FAILED', f'timed out after {timeout} s\n' + (e.stderr or b'').decode(errors='replace')[-3000:]
    if status == 'ok':
        c = subprocess.run(['nbdev_clean', '--fname', str(path)], cwd=ROOT, capture_output=True, text=True)
        if c.returncode: status, err = 'FAILED', 'nbdev_clean failed:\n' + c.stderr
    return status, time.perf_counter() - t0, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='*', type=Path, help='notebooks to execute (default: every nbs/*.ipynb not starting with _)')
    ap.add_argument('-j', '--jobs', type=int, default=1, help='notebooks executed at the same time (default 1)')
    ap.add_argument('--timeout', type=int, default=1800, help='seconds allowed per notebook (default 1800)')
    ap.add_argument('--child', type=Path, help=argparse.SUPPRESS)
    ap.add_argument('--flags', default='', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child: return _execute_here(a.child.resolve(), set(a.flags.split()))
    paths = [p.resolve() for p in a.notebooks] or sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_'))
    missing = [str(p) for p in paths if not p.is_file() or p.suffix != '.ipynb']
    if missing: ap.error(f"not a notebook: {', '.join(missing)}")
    flags, t0, failed = skip_flags(), time.perf_counter(), []

    def one(p):
        status, secs, err = run_one(p, flags, a.timeout)
        rel = p.relative_to(ROOT) if p.is_relative_to(ROOT) else p
        print(f'{secs:7.1f} s  {status:<8} {rel}' + (f'  ({figures(p)} figures)' if status == 'ok' else ''), flush=True)
        if status == 'FAILED': failed.append(rel); print(err, file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max(1, a.jobs)) as ex: list(ex.map(one, paths))
    size = sum(f.stat().st_size for f in NBS.rglob('*.ipynb'))
    print(f'{time.perf_counter() - t0:7.1f} s  total for {len(paths)} notebooks; {sum(figures(p) for p in NBS.glob("*.ipynb"))} figures '
          f'saved across nbs/, {size / 2**20:.1f} MiB of notebooks')
    if failed:
        print(f"FAILED: {', '.join(map(str, failed))} (not written; tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__': sys.exit(main())
