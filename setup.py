"""
Packaging for rqtwisted: RQ, the simple, reliable Unix job queue, on Twisted.

The twistd plugin lives in C{twisted/plugins/rq_plugin.py}; C{twisted/plugins}
has no C{__init__.py} (it is a namespace Twisted scans), so it is listed here
explicitly. The web app lives in C{web/} and is the package C{rqtwisted.web}
through the symlink C{rqtwisted/web}: with that, the layout is "simple", so an
editable install (C{pip install -e .}) puts the project directory itself on
C{sys.path}, where Twisted's plugin scan finds C{twisted/plugins/}.
"""

from setuptools import setup

#: The web app's data directories, listed as (namespace) packages of their
#: own: setuptools deprecates shipping a directory Python could import as
#: plain package data of its parent.
WEB_DATA = [
    "rqtwisted.web.templates",
    "rqtwisted.web.static",
    "rqtwisted.web.static.css",
    "rqtwisted.web.static.js",
]

setup(
    name="rqtwisted",
    version="0.1.0",
    description="RQ, the simple, reliable Unix job queue, rebuilt on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["rqtwisted", "rqtwisted.web", *WEB_DATA, "twisted.plugins"],
    package_dir={"": "."},
    package_data={name: ["*"] for name in WEB_DATA},
    include_package_data=True,
    install_requires=["twisted>=24.7", "treq>=24.9", "klein>=24.8", "multipart>=1.1", "croniter>=2.0"],
    extras_require={
        "test": ["pytest>=8", "pytest-twisted>=1.14", "pytest-timeout>=2", "hypothesis>=6", "playwright>=1.40"],
    },
    entry_points={"console_scripts": ["rq = rqtwisted.cli:main"]},
    zip_safe=False,
)
