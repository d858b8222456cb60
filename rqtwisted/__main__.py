"""
C{python -m rqtwisted} is the C{rq} command line.
"""

from rqtwisted.cli import main

raise SystemExit(main())
