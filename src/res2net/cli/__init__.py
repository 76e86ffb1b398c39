"""`res2net <command>`: one small module per command; `main` wires them."""
