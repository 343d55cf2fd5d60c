"""End-to-end runs built from the library: recipe files, the demo, the sensitivity and search runners."""
