"""The kopf operator for NeoXTraining and NeoXServing; it never imports torch."""
