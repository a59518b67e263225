from captioner.edges.cli import main

raise SystemExit(main())
