from windtunnel.cli import main

raise SystemExit(main())
