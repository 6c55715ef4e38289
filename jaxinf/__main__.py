from jaxinf.cli import entry

raise SystemExit(entry())
