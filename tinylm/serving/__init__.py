"""The story playground (inference.py --serve): its server (playground.py) and its one-file page
(playground.html)."""
