"""Write README.md from nbs/index.ipynb (quarto, which nbdev_readme needs, is not available everywhere).

`python .ci/readme.py` first refreshes, in nbs/index.ipynb, the block between
`<!-- quickstart-results:begin -->` and `<!-- quickstart-results:end -->` from the committed
quickstart run (results/quickstart/ and results/quickstart_default_kernels/), so the README never
quotes numbers that its result files do not hold; then it rewrites README.md. `--test-command`
prints the README's test command (the shell block that follows the line `<!-- test-command -->`),
which .ci/run executes.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / 'results' / 'quickstart'
BEGIN, END = '<!-- quickstart-results:begin -->', '<!-- quickstart-results:end -->'


def quickstart_block(folder=QUICKSTART):
    "Markdown quoting the committed quickstart run: settings, machine, time, both tables, the verdict, the kernel check."
    r = json.loads((folder / 'result.json').read_text())
    c, m = r['config'], r['machine_info']
    load = m.get('load_average_at_start') or [float('nan')] * 3
    other_path = folder.parent / 'quickstart_default_kernels' / 'result.json'
    lines = [f"The committed run (`results/quickstart/`: {len(c['seeds'])} seeds, shots {', '.join(map(str, c['shots']))}, "
             f"{c['steps']} steps, {c['dtype']}), on this project's {m['cpu_count']}-core {m['cpu_model']} with "
             f"{m['cpu_capability']} kernels and {r['workers']} worker processes, took {r['wall_time_s']:.0f} s of wall time"
             + (f" and {r['cpu_time_s']:.0f} s of CPU time" if r.get('cpu_time_s') else '') +
             (f" while other jobs shared the machine" if load[0] >= 1.5 else "") +
             f" (load average {load[0]:.1f} at the start). Test accuracy (%) on held-out images of "
             f"5–9, mean ± std over the {len(c['seeds'])} seeds:", '',
             (folder / 'table.md').read_text().strip(), '',
             f"Paired differences in points, mean [95% CI] over the {len(c['seeds'])} seeds (`all`: each seed's mean "
             f"over the shot counts):", '', (folder / 'comparisons.md').read_text().strip(), '',
             f"Verdict, read off the pooled intervals (`>`: above 0, `<`: below 0, `~`: contains 0): **{r['verdict']}**."]
    if other_path.exists():
        o = json.loads(other_path.read_text())
        same = o['verdict'] == r['verdict'] and o['results'] == r['results'] and o['lrs'] == r['lrs']
        lines.append(f"Run again with `ATEN_CPU_CAPABILITY={o['machine_info']['cpu_capability'].lower()}` "
                     f"(`results/quickstart_default_kernels/`): " + (
                         "the same lrs, the same accuracies to the last digit and the same verdict." if same else
                         f"verdict {o['verdict']}" + ('' if o['results'] == r['results'] else ', with different accuracies') + '.'))
    return '\n'.join(lines)


def refresh_index(nb_path=ROOT / 'nbs' / 'index.ipynb'):
    "Replace the quickstart block of index.ipynb by `quickstart_block()`; True if the file changed."
    text = nb_path.read_text()
    nb = json.loads(text)
    for c in nb['cells']:
        src = ''.join(c['source'])
        if BEGIN in src and END in src:
            new = re.sub(re.escape(BEGIN) + '.*?' + re.escape(END), lambda _: f'{BEGIN}\n{quickstart_block()}\n{END}', src, flags=re.S)
            c['source'] = new.splitlines(True)
    out = json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n'
    if out != text: nb_path.write_text(out)
    return out != text


def render(nb_path=ROOT / 'nbs' / 'index.ipynb'):
    "Markdown cells verbatim, code cells as python blocks; directive and hidden cells left out."
    out = []
    for c in json.loads(nb_path.read_text())['cells']:
        src = ''.join(c['source']).strip('\n')
        if c['cell_type'] == 'markdown': out.append(src)
        elif c['cell_type'] == 'code':
            lines = src.splitlines()
            if any(l.startswith('#| hide') for l in lines): continue
            code = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
            if code: out.append(f'```python\n{code}\n```')
    return '<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n' + '\n\n'.join(out) + '\n'

def test_command(text):
    m = re.search(r'<!-- test-command -->\s*```(?:sh|bash)\n(.+?)\n```', text, re.S)
    if not m: sys.exit('README.md has no <!-- test-command --> block')
    return m.group(1).strip()

if __name__ == '__main__':
    if '--test-command' in sys.argv: print(test_command((ROOT / 'README.md').read_text()))
    else:
        if QUICKSTART.joinpath('result.json').exists(): refresh_index()
        (ROOT / 'README.md').write_text(render())
