from im.cli import main; raise SystemExit(main())
