"""The names of the models a run trains and saves: checkpoint folders, converter roles, parameter lists.

D's role name is also the name of GAD's reward (``reward.source: discriminator``, the reward that trains it);
the two are kept apart: the reward's name lives in the reward registry, the role's here.
"""

STUDENT = "student"
D_ROLE = "discriminator"  # the discriminator: the student's copy with a scalar head on the last token
