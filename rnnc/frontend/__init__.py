"""The front end: `.cell` text to AST (parse) and AST to step IR (check)."""
