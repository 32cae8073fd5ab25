"""tcpclient's library: where to connect (connect.py), what the program is told (environment.py),
and the lookups that need the network (lookups.py, imported only when an option asks for one)."""
