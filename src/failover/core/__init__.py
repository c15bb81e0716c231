"""Store-agnostic machinery: endpoints, probes, breakers, the switch, monitors, events."""
