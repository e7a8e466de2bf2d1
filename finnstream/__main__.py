from finnstream.cli import main

raise SystemExit(main())
