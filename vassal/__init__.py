"""The vassal side: the runtime inside a jail (the top process, its phases, the app master, workers and the app server)."""
