from neuroscribe.cli import main

raise SystemExit(main())
