"""`ptm-nb html`: the executed paper notebooks of a scale as static HTML pages under `<scale>/html/`, with
their outputs as they ran (nothing is executed again), listed by `html/index.html` and linked from the index
page."""
import base64, io, json, os
import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell, new_output
from ptm_nb.cli import main
from ptm_nb.report import write_html, write_index

RECORD = {'notebook': 'fig5_overlap', 'scale': 'smoke', 'parameters': {'ipc': 2}, 'absent': [], 'files': [],
          'datasets': [{'paper': 'pathmnist', 'used': 'pathmnist_subset1000', 'stand_in': True,
                        'label': 'PathMNIST ← pathmnist_subset1000'}],
          'preset': {'net_options': {'width': 16}, 'experts': {}, 'eval': {'nets': 2}, 'methods': {}},
          'device': 'cpu', 'seconds': 1.0, 'finished': '2026-01-01T00:00:00+00:00'}


def png_base64() -> str:
    "A small PNG, as a figure's output holds it."
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1, 1), dpi=16); ax.plot([0, 1]); buf = io.BytesIO()
    fig.savefig(buf, format='png'); plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def executed(root, name='fig5_overlap'):
    "One small executed notebook and its record under `<root>/notebooks/`, as `reproduce` leaves them."
    png = png_base64()
    nb = new_notebook(cells=[
        new_markdown_cell('# Figure 5: the overlap term'),
        new_code_cell('print("accuracy 0.5")', execution_count=1,
                      outputs=[new_output('stream', name='stdout', text='accuracy 0.5\n')]),
        new_code_cell('fig', execution_count=2,
                      outputs=[new_output('display_data', data={'image/png': png, 'text/plain': 'Figure'})])])
    (root / 'notebooks').mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, root / 'notebooks' / f'{name}.ipynb')
    (root / 'notebooks' / f'{name}.json').write_text(json.dumps({**RECORD, 'notebook': name}))
    return png


def test_pages_with_their_outputs_listed_and_linked(tmp_path):
    root = tmp_path / 'smoke'
    png = executed(root)
    assert 'html' not in write_index(root).read_text()                # no pages yet: the index says nothing
    assert write_html(root) == [root / 'html' / 'fig5_overlap.html']
    page = (root / 'html' / 'fig5_overlap.html').read_text()
    assert 'accuracy 0.5' in page and f'data:image/png;base64,{png[:40]}' in page    # outputs, image inline
    assert '<title>fig5_overlap</title>' in page
    listing = (root / 'html' / 'index.html').read_text()
    assert '<a href="fig5_overlap.html">fig5_overlap</a>: Figure 5: the overlap term' in listing
    index = (root / 'README.md').read_text()
    assert '[html/index.html](html/index.html)' in index
    link = '[notebooks/fig5_overlap.ipynb](notebooks/fig5_overlap.ipynb) ([html](html/fig5_overlap.html))'
    assert link in index


def test_up_to_date_pages_are_kept_stale_ones_go(tmp_path):
    root = tmp_path / 'smoke'
    executed(root)
    page = root / 'html' / 'fig5_overlap.html'
    write_html(root); before = page.stat().st_mtime_ns
    assert write_html(root) == [] and page.stat().st_mtime_ns == before      # newer than its notebook: kept
    nb = root / 'notebooks' / 'fig5_overlap.ipynb'
    os.utime(nb, ns=(before + 10**9, before + 10**9))                             # the notebook ran again
    assert write_html(root) == [page]
    (root / 'notebooks' / 'table2_mnist.partial.ipynb').write_text(nb.read_text())   # running: not a page
    (root / 'html' / 'gone.html').write_text('<html></html>')                     # its notebook was removed
    assert write_html(root, force=True) == [page]
    assert sorted(p.name for p in (root / 'html').iterdir()) == ['fig5_overlap.html', 'index.html']


def test_the_command(tmp_path, capsys):
    assert main(['html', '--scale', 'quick', '--out', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'no executed notebook' in err and 'ptm-nb reproduce --scale quick' in err
    executed(tmp_path / 'quick', 'table2_mnist')
    assert main(['html', '--scale', 'quick', '--out', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '1 page(s) rendered' in out and str(tmp_path / 'quick' / 'html' / 'index.html') in out
    assert (tmp_path / 'quick' / 'html' / 'table2_mnist.html').exists()
