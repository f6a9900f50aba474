"""The vassal side: config, the top process, the app server."""
