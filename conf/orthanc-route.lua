-- Orthanc auto-routing to the her2map node (Orthanc >= 1.0).
--
-- Load with `"LuaScripts": ["/etc/orthanc/her2map-route.lua"]` and declare
-- the node under "DicomModalities" as "her2map" (see README, "Deployment
-- with Orthanc"). Every mammography, breast ultrasound and breast MRI
-- instance that reaches Orthanc over DICOM is forwarded to the node; the
-- node's own results (SR, heatmap secondary captures, sent with calling AE
-- HER2MAP) are kept in Orthanc and never sent back (no ping-pong).

local NODE = 'her2map'          -- the key under "DicomModalities"
local NODE_AET = 'HER2MAP'      -- the node's `dicom.ae_title`
local ROUTED = { MG = true, US = true, MR = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
   -- Only what arrived over DICOM, and never the node's own outputs.
   if origin == nil or origin['RequestOrigin'] ~= 'DicomProtocol' then
      return
   end
   if origin['RemoteAet'] == NODE_AET then
      return
   end
   if not ROUTED[tags['Modality'] or ''] then
      return
   end
   -- Breast only, when the modality says so: sites that also store other
   -- MR or US examinations can narrow here (BodyPartExamined is often
   -- empty on mammography, so an empty value is routed).
   local part = string.upper(tags['BodyPartExamined'] or '')
   if part ~= '' and part ~= 'BREAST' then
      return
   end
   SendToModality(instanceId, NODE)
end
