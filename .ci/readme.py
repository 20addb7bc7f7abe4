"""Write README.md from nbs/index.ipynb (quarto, which nbdev_readme needs, is not available everywhere).

`python .ci/readme.py` rewrites README.md; `--test-command` prints the README's test command
(the shell block that follows the line `<!-- test-command -->`), which .ci/run executes.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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
    else: (ROOT / 'README.md').write_text(render())
