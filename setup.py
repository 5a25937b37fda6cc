# Standard nbdev 2 setup: every field comes from settings.ini.
from configparser import ConfigParser
import setuptools, shlex

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['Planning', 'Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive']
lic = licenses[cfg['license'].lower()]
requirements = shlex.split(cfg.get('requirements', ''))
dev_requirements = shlex.split(cfg.get('dev_requirements', ''))

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], license=lic[0],
    classifiers=['Development Status :: ' + cfg['status'] + ' - ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'], 'License :: ' + lic[1],
                 'Natural Language :: ' + cfg['language'], 'Programming Language :: Python :: 3'],
    url=cfg['git_url'], packages=setuptools.find_namespace_packages(include=['ptm_nb', 'ptm_nb.*']),
    include_package_data=True, install_requires=requirements,
    extras_require={'dev': dev_requirements}, python_requires='>=' + cfg['min_python'],
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    zip_safe=False, author=cfg['author'], author_email=cfg['author_email'], description=cfg['description'],
    entry_points={'console_scripts': cfg.get('console_scripts', '').split(),
                  'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d']})
