"""tcpserver: listen, accept, decide each client, spawn the program."""
