from jaxinf.cli import main

raise SystemExit(main())
