"""Two real protein fragments used across tests (space-separated, ProteinLMDataset style)."""

P1 = "M K T A Y I A K Q R Q I S F V K S H F S R Q L E E R L G L I E V Q A P I L S R V G D G T Q D N L S G A E K"
P2 = "M S I P S S Q Y G F V F N K Q S G L K L R N D L P V H K P K A G Q L L L K V D A V G L C H S D L H V I Y"
