"""`nbdev_clean` must keep the `parameters` tag of every paper notebook: papermill puts its injected cell
right after the cell tagged `parameters`, so an injected value (`-p scale quick`) overrides the notebook's
default. Without the tag papermill puts its cell first, and the notebook's own defaults, run after it, win
silently.

settings.ini keeps the tag with `allowed_cell_metadata_keys = tags`. The first test cleans copies of the paper
notebooks with the repository's settings.ini; the second cleans them with that key list empty (the setting
before the fix) and shows that the same check then fails for every notebook."""
import json, re, subprocess, sys
from pathlib import Path
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

ROOT = Path(__file__).resolve().parents[1]
NBDEV_CLEAN = str(Path(sys.executable).parent / 'nbdev_clean')
PAPER = sorted((ROOT / 'nbs' / 'paper').glob('*.ipynb'))


def cleaned_copies(project: Path, allowed_cell_keys: str | None = None) -> Path:
    """Copies of the paper notebooks in a project folder `project`, cleaned by `nbdev_clean` run there: nbdev
    reads the settings.ini it finds from its working folder up, here the repository's (or with
    `allowed_cell_metadata_keys` set to `allowed_cell_keys`)."""
    cfg = (ROOT / 'settings.ini').read_text(encoding='utf-8')
    if allowed_cell_keys is not None:
        cfg, n = re.subn(r'(?m)^allowed_cell_metadata_keys *=.*$',
                         f'allowed_cell_metadata_keys = {allowed_cell_keys}'.rstrip(), cfg)
        assert n == 1, 'settings.ini has no allowed_cell_metadata_keys line'
    (project / 'settings.ini').write_text(cfg, encoding='utf-8')
    folder = project / 'nbs' / 'paper'
    folder.mkdir(parents=True)
    for p in PAPER:
        nb = json.loads(p.read_text(encoding='utf-8'))
        for cell in nb['cells']: cell['metadata']['collapsed'] = True      # a key the cleaner must drop
        (folder / p.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    r = subprocess.run([NBDEV_CLEAN, '--fname', 'nbs/paper'], cwd=project, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr      # nbdev only warns when a notebook fails
    for p in PAPER:                                                   # the cleaner did run on every copy
        cells = json.loads((folder / p.name).read_text(encoding='utf-8'))['cells']
        assert not any('collapsed' in c['metadata'] for c in cells), p.name
    return folder


def papermill_scale(path: Path) -> tuple:
    """Parameterise the notebook at `path` as papermill does with `-p scale injected`, then run its code cells
    in order up to the injected cell and the cell that sets the default `scale`: (index of the tagged
    `parameters` cell or None, index of the injected cell, the value of `scale` afterwards)."""
    nb = parameterize_notebook(load_notebook_node(str(path)), {'scale': 'injected'})
    tags = [cell.metadata.get('tags', []) for cell in nb.cells]
    param = next((i for i, t in enumerate(tags) if 'parameters' in t), None)
    injected = next(i for i, t in enumerate(tags) if 'injected-parameters' in t)
    defaults = next(i for i, c in enumerate(nb.cells) if i != injected and c.cell_type == 'code'
                    and re.search(r'(?m)^scale *=', c.source))
    namespace = {}
    for cell in nb.cells[:max(injected, defaults) + 1]:
        if cell.cell_type == 'code': exec(cell.source, namespace)    # only assignments up to there
    return param, injected, namespace.get('scale')


def problems(folder: Path) -> dict:
    "{notebook: what is wrong} for the cleaned notebooks in `folder`; empty when papermill will work."
    out = {}
    for p in PAPER:
        cells = json.loads((folder / p.name).read_text(encoding='utf-8'))['cells']
        tagged = [i for i, c in enumerate(cells) if 'parameters' in c['metadata'].get('tags', [])]
        param, injected, scale = papermill_scale(folder / p.name)
        if len(tagged) != 1: out[p.name] = f'{len(tagged)} cells tagged parameters after cleaning'
        elif injected != param + 1: out[p.name] = f'injected cell at {injected}, parameters cell at {param}'
        elif scale != 'injected': out[p.name] = f'scale is {scale!r} after the injected cell'
    return out


def test_paper_notebooks_exist():
    assert len(PAPER) >= 10 and {'table2_mnist.ipynb', 'fig5_overlap.ipynb'} <= {p.name for p in PAPER}


def test_clean_keeps_the_parameters_tag(tmp_path):
    "With the repository's settings.ini, every cleaned notebook keeps its tag and the injected value wins."
    folder = cleaned_copies(tmp_path)
    assert problems(folder) == {}
    param, injected, scale = papermill_scale(folder / 'table2_mnist.ipynb')
    assert (injected, scale) == (param + 1, 'injected')


def test_without_the_setting_the_check_fails(tmp_path):
    "`allowed_cell_metadata_keys =` empty (before the fix): the tag is stripped, the defaults win everywhere."
    found = problems(cleaned_copies(tmp_path, allowed_cell_keys=''))
    assert set(found) == {p.name for p in PAPER}, found
    param, injected, scale = papermill_scale(tmp_path / 'nbs' / 'paper' / 'table2_mnist.ipynb')
    assert (param, injected) == (None, 0) and scale != 'injected'   # injected first, then the default wins
